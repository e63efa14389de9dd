-- set_credit_limit: change how far a postpaid wallet may go below zero.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- ARGV[1] new credit_limit (micros, >= 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] reason   ARGV[5] metadata JSON   ARGV[6] idempotency key
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}; the
-- 'credit_limit' entry (amount 0) records the new limit and the one before.
-- Errors: CREDIT_LIMIT_IN_USE when the new limit is below what the wallet
-- already uses of it (its debt plus its holds beyond its balance): lowering it
-- that far would leave calls in flight uncovered.
-- Keeps: available (balance - held + credit_limit) never goes below 0;
-- balance == sum of ledger amounts (the entry moves nothing).
local limit = int_arg(ARGV[1], 0, MAX_AMOUNT)
if limit == nil then
  return fail('INVALID_AMOUNT', 'credit_limit_micros must be an integer between 0 and ' .. fmt(MAX_AMOUNT))
end
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
local in_use = math.max(held - balance, 0)
if limit < in_use then
  return fail('CREDIT_LIMIT_IN_USE', 'the wallet uses ' .. fmt(in_use) .. ' micros of its credit line; the limit cannot go below that')
end
redis.call('HSET', KEYS[1], 'credit_limit', fmt(limit))
local id = append_ledger(KEYS[2], {'type', 'credit_limit', 'amount', '0', 'balance', fmt(balance), 'held', fmt(held),
  'credit_limit', fmt(limit), 'previous_credit_limit', fmt(credit_limit), 'reason', ARGV[4],
  'idempotency_key', ARGV[6], 'meta', ARGV[5]})
local result = {'ok', id, fmt(balance), fmt(held), fmt(limit)}
remember_result(KEYS[3], ARGV[2], ARGV[3], result)
return result
