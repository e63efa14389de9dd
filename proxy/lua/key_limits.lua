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
local WINDOW = 60000
local DAY = 86400000
local now = now_ms()
local minute = math.floor(now / WINDOW)
local today = math.floor(now / DAY)

local function num(v)
  return tonumber(v) or 0
end

local f = redis.call('HMGET', KEYS[1], 'win', 'rq', 'rq0', 'tk', 'tk0', 'spent', 'day', 'spent_day')
local win, rq, rq0, tk, tk0 = num(f[1]), num(f[2]), num(f[3]), num(f[4]), num(f[5])
local spent, day, spent_day = num(f[6]), num(f[7]), num(f[8])
-- Roll the minute windows and the day forward (nothing is written yet).
if minute ~= win then
  if minute == win + 1 then
    rq0, tk0 = rq, tk
  else
    rq0, tk0 = 0, 0
  end
  rq, tk, win = 0, 0, minute
end
if day ~= today then
  day, spent_day = today, 0
end
local prev_weight = (WINDOW - (now % WINDOW)) / WINDOW

local function save()
  redis.call('HSET', KEYS[1], 'win', fmt(win), 'rq', fmt(rq), 'rq0', fmt(rq0), 'tk', fmt(tk), 'tk0', fmt(tk0),
    'spent', fmt(spent), 'day', fmt(day), 'spent_day', fmt(spent_day))
end

-- ms until `prev * weight + cur + want <= limit`, or the end of the next window.
local function retry_after(prev, cur, want, limit)
  if prev > 0 and cur + want <= limit then
    local needed = 1 - (limit - cur - want) / prev  -- fraction of the window that must pass
    return math.max(1, math.ceil(needed * WINDOW - (now % WINDOW)))
  end
  return (WINDOW - (now % WINDOW)) + WINDOW
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
    local used = math.floor(rq0 * prev_weight) + rq
    if used + 1 > rpm then
      return {'limited', 'requests', fmt(rpm), fmt(used), fmt(retry_after(rq0, rq, 1, rpm))}
    end
  end
  if tpm > 0 then
    local used = math.floor(tk0 * prev_weight) + tk
    if used + tokens > tpm then
      return {'limited', 'tokens', fmt(tpm), fmt(used), fmt(retry_after(tk0, tk, tokens, tpm))}
    end
  end
  if cap >= 0 and spent + amount > cap then
    return {'limited', 'spend', fmt(cap), fmt(spent), '0'}
  end
  if daily_cap >= 0 and spent_day + amount > daily_cap then
    return {'limited', 'daily_spend', fmt(daily_cap), fmt(spent_day), fmt(DAY - (now % DAY))}
  end
  rq, tk = rq + 1, tk + tokens
  spent, spent_day = spent + amount, spent_day + amount
  save()
  redis.call('HSET', KEYS[1], 'r:' .. ARGV[2], fmt(amount) .. '|' .. fmt(today) .. '|' .. fmt(tokens) .. '|' .. fmt(minute))
  return {'ok'}
end

if ARGV[1] == 'record' then
  local captured = int_arg(ARGV[3], 0, MAX_AMOUNT)
  local used = int_arg(ARGV[4], 0, MAX_AMOUNT)
  if captured == nil or used == nil then
    return fail('INVALID_AMOUNT', 'captured micros and tokens must be non-negative integers')
  end
  local res = redis.call('HGET', KEYS[1], 'r:' .. ARGV[2])
  if res then
    local r_amount, r_day, r_tokens, r_minute = string.match(res, '^(%d+)|(%d+)|(%d+)|(%d+)$')
    r_amount, r_day, r_tokens, r_minute = tonumber(r_amount), tonumber(r_day), tonumber(r_tokens), tonumber(r_minute)
    redis.call('HDEL', KEYS[1], 'r:' .. ARGV[2])
    spent = math.max(0, spent + captured - r_amount)
    if r_day == today then
      spent_day = math.max(0, spent_day + captured - r_amount)
    else
      spent_day = spent_day + captured
    end
    if r_minute == win then
      tk = math.max(0, tk + used - r_tokens)
    elseif r_minute == win - 1 then
      tk0 = math.max(0, tk0 + used - r_tokens)
    end
  else
    spent, spent_day, tk = spent + captured, spent_day + captured, tk + used
  end
  save()
  return {'ok', fmt(spent), fmt(spent_day)}
end

return fail('INVALID_REQUEST', 'mode must be admit or record')
