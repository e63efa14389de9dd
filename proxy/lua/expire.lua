-- expire: close a hold whose TTL has passed (the proxy that held it died or
-- lost the store mid-call). A hold whose call checkpointed its counted usage
-- (see extend.lua) is charged that checkpoint -- the provider billed what was
-- relayed -- with the checkpoint's metadata; a hold without one is released.
-- KEYS[1] wallet hash   KEYS[2] active holds hash   KEYS[3] this hold's record
-- KEYS[4] ledger stream
-- ARGV[1] hold id   ARGV[2] seconds to keep the closed hold's record
-- Optional: KEYS[5] the limits hash of the credential recorded on the hold
-- (its request id is read from the hold's record): the capture and its tokens
-- replace the call's spend reservation, in the same step.
-- Returns {'ok', ledger_id, captured, released, shortfall, balance, held, credit_limit},
-- {'not_due', expires_ms} while the TTL has not passed (a live call refreshed
-- it), or {'closed', status} when the hold was already settled or released.
-- Keeps: balance == sum of ledger amounts; held == sum of active holds;
-- balance never below -credit_limit, and a credential's caps are never passed
-- (a checkpoint is captured as a settle is).
local h = hold_load(KEYS[3], hold_close_fields({'expires_ms', 'checkpoint_tokens', 'checkpoint_meta',
  'request_id', 'meta'}))
if h.status == nil then
  return fail('HOLD_NOT_FOUND', 'no hold ' .. ARGV[1] .. ' in this wallet')
end
if h.status ~= 'active' then
  return {'closed', h.status}
end
if tonumber(h.expires_ms) > now_ms() then
  return {'not_due', h.expires_ms}
end
local checkpoint = tonumber(h.checkpoint) or 0
local L, cap_room = nil, nil
if KEYS[5] and h.request_id then
  L = limits_load(KEYS[5], h.request_id)
  local cap, daily_cap = hold_caps(h)
  cap_room = limits_room(L, h.request_id, cap, daily_cap)
end
local result, captured
if checkpoint > 0 then
  result, captured = capture_hold(ARGV[1], h, checkpoint, h.checkpoint_meta or '', cap_room)
else
  result, captured = release_hold(ARGV[1], h, 'expire', 'ttl passed'), 0
end
if L ~= nil then
  limits_record(L, h.request_id, captured, captured > 0 and (tonumber(h.checkpoint_tokens) or 0) or 0)
end
redis.call('HSET', KEYS[3], 'status', 'expired', 'release_result', table.concat(result, ',', 2))
redis.call('EXPIRE', KEYS[3], ARGV[2])
return result
