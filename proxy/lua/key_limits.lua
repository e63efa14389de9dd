-- key_limits: the per-credential limits of an end-user key or token, checked and
-- counted in one step: requests and tokens per minute (sliding window), spend
-- over the key's lifetime and per UTC day.
-- KEYS[1] this credential's limits hash (in the end user's {w:<id>} slot).
-- Fields: win (current minute), rq/rq0 and tk/tk0 (requests and tokens in the
-- current/previous minute), spent (lifetime micros), day + spent_day (UTC day
-- number and its micros), r:<request id> = 'spend|day|tokens|minute' for each
-- admitted call not yet recorded.
--
-- ARGV[1] 'admit'  ARGV[2] request id  ARGV[3] requests/min limit (0: none)
--   ARGV[4] tokens/min limit (0: none)  ARGV[5] tokens this call may use
--   ARGV[6] lifetime spend cap (-1: none)  ARGV[7] daily spend cap (-1: none)
--   ARGV[8] micros this call may spend (its hold)
--   Returns {'ok'} after counting the call (its request, its tokens, its hold as
--   spend, and its reservation), or {'limited', what, limit, used, retry_after_ms}
--   with what in requests|tokens|spend|daily_spend and nothing changed.
-- ARGV[1] 'record'  ARGV[2] request id  ARGV[3] micros captured  ARGV[4] tokens used
--   Replaces the call's reservation (if any) by what it really spent and used;
--   without one, adds them. Returns {'ok', spent, spent_day}.
-- Keeps: spent == sum of captured micros of recorded calls + reserved micros of
-- admitted, unrecorded ones; so spent + hold <= cap is checked against every
-- concurrent call, and a call refused here changed nothing.
local L = limits_load(KEYS[1])
local now, minute, today = L.now, L.minute, L.today
local WINDOW, DAY = LIMITS_WINDOW, LIMITS_DAY
local prev_weight = (WINDOW - (now % WINDOW)) / WINDOW

-- ms until the call fits: the first moment at which `floor(prev * weight) + cur
-- + want <= limit` (the rule below) holds, the windows rolling over as they will
-- if nothing else is admitted; -1 when it never fits (want > limit).
-- At `y` ms into a window whose previous one counted `p`, the call fits when
-- floor(p * (WINDOW - y) / WINDOW) <= room, i.e. p * (WINDOW - y) <= (room + 1) * WINDOW - 1.
local function first_fit(p, room)
  return WINDOW - math.floor(((room + 1) * WINDOW - 1) / p)
end

local function retry_after(prev, cur, want, limit)
  local elapsed = now % WINDOW
  if cur + want <= limit then  -- later in this window, as the previous one weighs less
    if prev == 0 then
      return 1
    end
    return math.max(1, first_fit(prev, limit - cur - want) - elapsed)
  end
  if want > limit then
    return -1
  end
  -- in the next window, where this one's count is the previous one's
  return (WINDOW - elapsed) + math.max(0, first_fit(cur, limit - want))
end

if ARGV[1] == 'admit' then
  local rpm = int_arg(ARGV[3], 0, MAX_AMOUNT)
  local tpm = int_arg(ARGV[4], 0, MAX_AMOUNT)
  local tokens = int_arg(ARGV[5], 0, MAX_AMOUNT)
  local cap = int_arg(ARGV[6], -1, MAX_AMOUNT)
  local daily_cap = int_arg(ARGV[7], -1, MAX_AMOUNT)
  local amount = int_arg(ARGV[8], 0, MAX_AMOUNT)
  if rpm == nil or tpm == nil or tokens == nil or cap == nil or daily_cap == nil or amount == nil then
    return fail('INVALID_REQUEST', 'limits must be integers')
  end
  if rpm > 0 then
    local used = math.floor(L.rq0 * prev_weight) + L.rq
    if used + 1 > rpm then
      return {'limited', 'requests', fmt(rpm), fmt(used), fmt(retry_after(L.rq0, L.rq, 1, rpm))}
    end
  end
  if tpm > 0 then
    local used = math.floor(L.tk0 * prev_weight) + L.tk
    if used + tokens > tpm then
      return {'limited', 'tokens', fmt(tpm), fmt(used), fmt(retry_after(L.tk0, L.tk, tokens, tpm))}
    end
  end
  if cap >= 0 and L.spent + amount > cap then
    return {'limited', 'spend', fmt(cap), fmt(L.spent), '0'}
  end
  if daily_cap >= 0 and L.spent_day + amount > daily_cap then
    return {'limited', 'daily_spend', fmt(daily_cap), fmt(L.spent_day), fmt(DAY - (now % DAY))}
  end
  L.rq, L.tk = L.rq + 1, L.tk + tokens
  L.spent, L.spent_day = L.spent + amount, L.spent_day + amount
  limits_save(L)
  redis.call('HSET', KEYS[1], 'r:' .. ARGV[2], fmt(amount) .. '|' .. fmt(today) .. '|' .. fmt(tokens) .. '|' .. fmt(minute))
  return {'ok'}
end

if ARGV[1] == 'record' then
  local captured = int_arg(ARGV[3], 0, MAX_AMOUNT)
  local used = int_arg(ARGV[4], 0, MAX_AMOUNT)
  if captured == nil or used == nil then
    return fail('INVALID_AMOUNT', 'captured micros and tokens must be non-negative integers')
  end
  limits_record(L, ARGV[2], captured, used)
  return {'ok', fmt(L.spent), fmt(L.spent_day)}
end

return fail('INVALID_REQUEST', 'mode must be admit or record')
