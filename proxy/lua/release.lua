-- release: give a whole hold back (the call failed before any output) or, with
-- ARGV[3] = 'expire', expire it (its TTL passed: the proxy that held it died).
-- KEYS[1] wallet hash   KEYS[2] active holds hash   KEYS[3] this hold's record
-- KEYS[4] ledger stream
-- ARGV[1] hold id   ARGV[2] reason   ARGV[3] 'release' or 'expire'
-- ARGV[4] seconds to keep the closed hold's record
-- Optional: KEYS[5] the limits hash of the credential that made the call and
-- ARGV[5] its request id: the call's spend reservation is then given back too.
-- Returns {'ok'|'replay', ledger_id, captured (0), released, shortfall (0), balance, held, credit_limit}
-- or, for 'expire' of a hold whose TTL has not passed, {'not_due', expires_ms}.
-- Releasing a released hold replays; releasing a settled or expired hold is
-- HOLD_CLOSED. Keeps: held == sum of active holds; balance is untouched.
local mode = ARGV[3]
if mode ~= 'release' and mode ~= 'expire' then
  return fail('INVALID_REQUEST', 'mode must be release or expire')
end
local rec = redis.call('HMGET', KEYS[3], 'status', 'amount', 'expires_ms', 'release_result')
if rec[1] == false then
  return fail('HOLD_NOT_FOUND', 'no hold ' .. ARGV[1] .. ' in this wallet')
end
local closed_as = mode == 'release' and 'released' or 'expired'
if rec[1] == closed_as then
  return stored_replay(rec[4])
end
if rec[1] ~= 'active' then
  return fail('HOLD_CLOSED', 'hold ' .. ARGV[1] .. ' was already ' .. rec[1])
end
if mode == 'expire' and tonumber(rec[3]) > now_ms() then
  return {'not_due', rec[3]}
end
local balance, held, credit_limit = wallet_state(KEYS[1])
local hold_amount = tonumber(rec[2])
held = redis.call('HINCRBY', KEYS[1], 'held', -hold_amount)
redis.call('HDEL', KEYS[2], ARGV[1])
local id = append_ledger(KEYS[4], {'type', mode, 'amount', '0', 'held_delta', fmt(-hold_amount),
  'balance', fmt(balance), 'held', fmt(held), 'hold_id', ARGV[1], 'reason', ARGV[2]})
local result = {'ok', id, '0', fmt(hold_amount), '0', fmt(balance), fmt(held), fmt(credit_limit)}
if KEYS[5] then
  limits_record(limits_load(KEYS[5]), ARGV[5], 0, 0)
end
redis.call('HSET', KEYS[3], 'status', closed_as, 'release_result', table.concat(result, ',', 2))
redis.call('EXPIRE', KEYS[3], ARGV[4])
return result
