-- release: give a whole hold back (the call failed before any output, or never
-- reached its upstream).
-- KEYS[1] wallet hash   KEYS[2] active holds hash   KEYS[3] this hold's record
-- KEYS[4] ledger stream
-- ARGV[1] hold id   ARGV[2] reason   ARGV[3] seconds to keep the closed hold's record
-- Optional: KEYS[5] the limits hash of the credential that made the call and
-- ARGV[4] its request id: the call's spend reservation is then given back too.
-- ARGV[5] (optional) metadata JSON for the release entry; without it the entry
-- carries the metadata the hold was placed with.
-- Returns {'ok'|'replay', ledger_id, captured (0), released, shortfall (0), balance, held, credit_limit}.
-- Releasing a released hold replays; releasing a settled or expired hold is
-- HOLD_CLOSED. Keeps: held == sum of active holds; balance is untouched.
local h = hold_load(KEYS[3], hold_close_fields({'release_result', 'meta'}))
if h.status == nil then
  return fail('HOLD_NOT_FOUND', 'no hold ' .. ARGV[1] .. ' in this wallet')
end
if h.status == 'released' then
  return stored_replay(h.release_result)
end
if h.status ~= 'active' then
  return fail('HOLD_CLOSED', 'hold ' .. ARGV[1] .. ' was already ' .. h.status)
end
local result = release_hold(ARGV[1], h, 'release', ARGV[2], ARGV[5])
if KEYS[5] then
  limits_record(limits_load(KEYS[5], ARGV[4]), ARGV[4], 0, 0)
end
redis.call('HSET', KEYS[3], 'status', 'released', 'release_result', table.concat(result, ',', 2))
redis.call('EXPIRE', KEYS[3], ARGV[3])
return result
