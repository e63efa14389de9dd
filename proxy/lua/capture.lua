-- capture: take part of an active hold for good and keep the rest held (a step
-- of a long job; TigerBeetle's posting of part of a pending transfer). The hold
-- stays open for more captures, an extension, a release of the rest, or the
-- reaper's expiry (which releases what is left).
-- KEYS[1] wallet hash   KEYS[2] active holds hash   KEYS[3] this hold's record
-- KEYS[4] ledger stream   KEYS[5] idempotency record of this capture
-- ARGV[1] hold id   ARGV[2] amount (micros, > 0, at most what the hold has left)
-- ARGV[3] fingerprint   ARGV[4] idempotency TTL (s)   ARGV[5] metadata JSON
-- Returns {'ok'|'replay', ledger_id, captured, left on the hold, balance, held, credit_limit}.
-- Errors: INVALID_AMOUNT (not positive, or more than the hold has left),
-- HOLD_NOT_FOUND, HOLD_CLOSED, IDEMPOTENCY_CONFLICT (the same key with another body).
-- Keeps: balance == sum of ledger amounts == sum of grants (drawn in order,
-- see grants_debit); held == sum of active holds; only
-- held funds are captured, so available is unchanged and the balance never
-- goes below -credit_limit.
local replay = idempotent_replay(KEYS[5], ARGV[3])
if replay then
  return replay
end
local amount = int_arg(ARGV[2], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'the capture must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
local rec = redis.call('HMGET', KEYS[3], 'status', 'amount')
if rec[1] == false then
  return fail('HOLD_NOT_FOUND', 'no hold ' .. ARGV[1] .. ' in this wallet')
end
if rec[1] ~= 'active' then
  return fail('HOLD_CLOSED', 'hold ' .. ARGV[1] .. ' was already ' .. rec[1])
end
local left = tonumber(rec[2])
if amount > left then
  return fail('INVALID_AMOUNT', 'the capture of ' .. fmt(amount) .. ' micros exceeds the ' .. fmt(left) .. ' the hold has left')
end
local G = grants_load(KEYS[1])
if grants_due(KEYS[1]) then
  local b, h = wallet_state(KEYS[1])
  grants_sweep(G, KEYS[4], h, b)
end
local draws = grants_debit(G, amount, true)
local balance = redis.call('HINCRBY', KEYS[1], 'balance', 0 - amount)
local held = redis.call('HINCRBY', KEYS[1], 'held', 0 - amount)
local _, _, credit_limit = wallet_state(KEYS[1])
left = redis.call('HINCRBY', KEYS[2], ARGV[1], 0 - amount)
redis.call('HSET', KEYS[3], 'amount', left)
redis.call('HINCRBY', KEYS[3], 'captured', amount)
local id = append_ledger(KEYS[4], {'type', 'charge', 'amount', fmt(0 - amount), 'held_delta', fmt(0 - amount),
  'balance', fmt(balance), 'held', fmt(held), 'hold_id', ARGV[1], 'requested', fmt(amount), 'shortfall', '0',
  'grants', draws, 'meta', ARGV[5]})
grants_save(G)
balance = grants_sweep_if_due(KEYS[1], KEYS[4], held, balance)
local result = {'ok', id, fmt(amount), fmt(left), fmt(balance), fmt(held), fmt(credit_limit)}
remember_result(KEYS[5], ARGV[3], ARGV[4], result)
return result
