-- meter: charge a usage event of a non-token meter (crawler hours, pages...):
-- count its units against the end user's free allowance for the period and
-- debit the price of the rest, in one step, or refuse it whole.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- KEYS[4] the meter's units used this period (a counter, micro-units)
-- ARGV[1] quantity (micro-units, > 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] the period's units used as the caller read them (what `amount` was priced on)
-- ARGV[5] amount to debit (micros, >= 0)   ARGV[6] seconds the period counter lives
-- ARGV[7] metadata JSON
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit, used after, amount debited},
-- or {'stale', used} when the counter moved since it was read (the caller
-- prices the event again on the new count: free units are never granted twice).
-- Errors: INSUFFICIENT_FUNDS (nothing is counted or debited), INVALID_AMOUNT,
-- IDEMPOTENCY_CONFLICT.
-- Keeps: balance == sum of ledger amounts == sum of grants; available never goes below 0 (a
-- meter event only spends what is available, never a hold's funds).
local replay = idempotent_replay(KEYS[3], ARGV[2])
if replay then
  return replay
end
local quantity = int_arg(ARGV[1], 1, MAX_AMOUNT)
local seen = int_arg(ARGV[4], 0, MAX_BALANCE)
local amount = int_arg(ARGV[5], 0, MAX_AMOUNT)
local ttl = int_arg(ARGV[6], 1, 400 * 86400)
if quantity == nil or seen == nil or amount == nil or ttl == nil then
  return fail('INVALID_AMOUNT', 'the quantity, count, amount and ttl must be integers in range')
end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used ~= seen then
  return {'stale', fmt(used)}
end
local balance, held, credit_limit = wallet_state(KEYS[1])
if balance == nil then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
balance = grants_sweep_if_due(KEYS[1], KEYS[2], held, balance)
local available = balance - held + credit_limit
if amount > available then
  return fail('INSUFFICIENT_FUNDS', 'this event costs ' .. fmt(amount) .. ' micros and ' .. fmt(available) .. ' are available')
end
used = redis.call('INCRBY', KEYS[4], quantity)
redis.call('EXPIRE', KEYS[4], ttl)
local G = grants_load(KEYS[1])
local draws = grants_debit(G, amount, false)
balance = redis.call('HINCRBY', KEYS[1], 'balance', 0 - amount)
local id = append_ledger(KEYS[2], {'type', 'charge', 'amount', fmt(0 - amount), 'balance', fmt(balance),
  'held', fmt(held), 'grants', draws, 'meta', ARGV[7]})
grants_save(G)
local result = {'ok', id, fmt(balance), fmt(held), fmt(credit_limit), fmt(used), fmt(amount)}
remember_result(KEYS[3], ARGV[2], ARGV[3], result)
return result
