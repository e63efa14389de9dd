-- top_up: add prepaid funds to a wallet.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- ARGV[1] amount (micros, > 0)   ARGV[2] request fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] reference (free text, e.g. a Stripe payment id)   ARGV[5] metadata JSON
-- ARGV[6] idempotency key (recorded in the ledger entry)
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}.
-- Keeps: balance == sum of ledger amounts (the entry carries +amount).
local amount = int_arg(ARGV[1], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'amount_micros must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
local replay = idempotent_replay(KEYS[3], ARGV[2])
if replay then
  return replay
end
local balance, held, credit_limit = wallet_state(KEYS[1])
if balance == nil then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
if balance + amount > MAX_BALANCE then
  return fail('BALANCE_LIMIT', 'the balance would exceed ' .. fmt(MAX_BALANCE) .. ' micros')
end
balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
local id = append_ledger(KEYS[2], {'type', 'top_up', 'amount', fmt(amount), 'balance', fmt(balance),
  'held', fmt(held), 'reference', ARGV[4], 'idempotency_key', ARGV[6], 'meta', ARGV[5]})
local result = {'ok', id, fmt(balance), fmt(held), fmt(credit_limit)}
remember_result(KEYS[3], ARGV[2], ARGV[3], result)
return result
