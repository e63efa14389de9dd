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
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
local result, err = balance_op_finish('top_up', amount, balance, held, credit_limit,
  {'reference', ARGV[4], 'idempotency_key', ARGV[6], 'meta', ARGV[5]})
return result or err
