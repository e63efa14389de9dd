-- settle: capture the exact cost of a finished call and release the rest of its hold.
-- KEYS[1] wallet hash   KEYS[2] active holds hash   KEYS[3] this hold's record
-- KEYS[4] ledger stream
-- ARGV[1] hold id   ARGV[2] amount to capture (micros, >= 0, may exceed the hold)
-- ARGV[3] metadata JSON (tokens, price, cost, model, request id...)
-- ARGV[4] seconds to keep the closed hold's record (for replays)
-- Optional, for calls made with an end-user key or token: KEYS[5] that
-- credential's limits hash, ARGV[5] the call's request id, ARGV[6] tokens
-- used; the capture is then counted as the credential's spend in the same step,
-- and never takes it past the caps the hold was admitted under (the excess is
-- part of the shortfall). ARGV[7] '1': that credential has no limits at all (the
-- call was admitted without a reservation), so only its spend is counted, not
-- its token window, unless the hold grew under it (see limits_record_spend).
-- Returns {'ok'|'replay', ledger_id, captured, released, shortfall, balance, held, credit_limit}.
-- More than the hold is captured only as far as the wallet allows (down to
-- -credit_limit once this hold is released); what could not be captured is
-- recorded as the shortfall (see capture_hold). Settling a settled hold replays
-- the first result; settling a released or expired hold is HOLD_CLOSED.
-- Keeps: balance == sum of ledger amounts; held == sum of active holds;
-- balance never goes below -credit_limit.
local amount = int_arg(ARGV[2], 0, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'the settle amount must be an integer between 0 and ' .. fmt(MAX_AMOUNT))
end
local tokens_used = 0
if KEYS[5] then
  tokens_used = int_arg(ARGV[6], 0, MAX_AMOUNT)
  if tokens_used == nil then
    return fail('INVALID_REQUEST', 'tokens used must be a non-negative integer')
  end
end
local h = hold_load(KEYS[3], hold_close_fields({'settle_result'}))
if h.status == nil then
  return fail('HOLD_NOT_FOUND', 'no hold ' .. ARGV[1] .. ' in this wallet')
end
if h.status == 'settled' then
  return stored_replay(h.settle_result)
end
if h.status ~= 'active' then
  return fail('HOLD_CLOSED', 'hold ' .. ARGV[1] .. ' was already ' .. h.status)
end
local L, cap_room = nil, nil
local spend_only = KEYS[5] ~= nil and ARGV[7] == '1'
if KEYS[5] and not spend_only then
  L = limits_load(KEYS[5], ARGV[5])
  local cap, daily_cap = hold_caps(h)
  cap_room = limits_room(L, ARGV[5], cap, daily_cap)
end
local result, captured = capture_hold(ARGV[1], h, amount, ARGV[3], cap_room)
if L ~= nil then
  limits_record(L, ARGV[5], captured, tokens_used)
elseif spend_only then
  limits_record_spend(KEYS[5], ARGV[5], captured, tokens_used)
end
redis.call('HSET', KEYS[3], 'status', 'settled', 'settle_result', table.concat(result, ',', 2))
redis.call('EXPIRE', KEYS[3], ARGV[4])
return result
