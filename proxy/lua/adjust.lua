-- adjust: a signed correction by an operator, with a mandatory reason.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- ARGV[1] amount (micros, signed, != 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] reason   ARGV[5] metadata JSON   ARGV[6] idempotency key (for the ledger)
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}.
-- Keeps: a debit never takes available (balance - held + credit_limit) below 0,
-- so holds already granted stay covered; balance == sum of ledger amounts.
local amount = int_arg(ARGV[1], -MAX_AMOUNT, MAX_AMOUNT)
if amount == nil or amount == 0 then
  return fail('INVALID_AMOUNT', 'amount_micros must be a non-zero integer between -' .. fmt(MAX_AMOUNT) .. ' and ' .. fmt(MAX_AMOUNT))
end
if ARGV[4] == '' then
  return fail('INVALID_REQUEST', 'a reason is required')
end
local replay = idempotent_replay(KEYS[3], ARGV[2])
if replay then
  return replay
end
local balance, held, credit_limit = wallet_state(KEYS[1])
if balance == nil then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
if amount < 0 and balance - held + credit_limit + amount < 0 then
  return fail('INSUFFICIENT_FUNDS', 'available is ' .. fmt(balance - held + credit_limit) .. ' micros')
end
if balance + amount > MAX_BALANCE then
  return fail('BALANCE_LIMIT', 'the balance would exceed ' .. fmt(MAX_BALANCE) .. ' micros')
end
balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
local id = append_ledger(KEYS[2], {'type', 'adjustment', 'amount', fmt(amount), 'balance', fmt(balance),
  'held', fmt(held), 'reason', ARGV[4], 'idempotency_key', ARGV[6], 'meta', ARGV[5]})
local result = {'ok', id, fmt(balance), fmt(held), fmt(credit_limit)}
remember_result(KEYS[3], ARGV[2], ARGV[3], result)
return result
