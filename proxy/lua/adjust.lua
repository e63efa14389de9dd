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
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
if amount < 0 and balance - held + credit_limit + amount < 0 then
  return fail('INSUFFICIENT_FUNDS', 'available is ' .. fmt(balance - held + credit_limit) .. ' micros')
end
local result, err = balance_op_finish('adjustment', amount, balance, held, credit_limit,
  {'reason', ARGV[4], 'idempotency_key', ARGV[6], 'meta', ARGV[5]})
return result or err
