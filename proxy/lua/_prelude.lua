-- Prelude: prepended by proxy/store/scripts.py to every wallet script; never run alone.
-- It holds only pure helpers (no writes), so each script below still reads as
-- "validate everything, then write": Redis does not roll back a script that
-- fails half-way, so no script may fail after its first write.
--
-- Numbers: Lua numbers are doubles, exact for integers below 2^53. Amounts are
-- capped at MAX_AMOUNT and balances at MAX_BALANCE so every sum stays exact,
-- and numbers leave the script through fmt() ('%d'), never tostring(), which
-- would switch to exponent notation above 1e14.
local MAX_AMOUNT = 1000000000000000   -- 1e15 micros = 1,000,000,000 USD
local MAX_BALANCE = 4000000000000000  -- 4e15 micros, far below 2^53

local function fmt(n)
  return string.format('%d', n)
end

-- An integer argument in [lo, hi], or nil.
local function int_arg(value, lo, hi)
  if value == nil or not string.match(value, '^%-?%d+$') then
    return nil
  end
  local n = tonumber(value)
  if n == nil or n < lo or n > hi then
    return nil
  end
  return n
end

local function fail(code, message)
  return redis.error_reply(code .. ' ' .. message)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- balance, held, credit_limit of a wallet hash, or nil when it does not exist.
local function wallet_state(key)
  local v = redis.call('HMGET', key, 'balance', 'held', 'credit_limit')
  if v[1] == false then
    return nil
  end
  return tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
end

-- A result kept as 'a,b,c' (see remember_result), answered again as {'replay', a, b, c}.
local function stored_replay(text)
  local out = {'replay'}
  for part in string.gmatch(text, '[^,]+') do
    out[#out + 1] = part
  end
  return out
end

-- Idempotency record: {'replay', ...first result} for the same fingerprint,
-- an error for a different one, nil when the key is new (or not given).
local function idempotent_replay(idem_key, fingerprint)
  if idem_key == nil then
    return nil
  end
  local rec = redis.call('HMGET', idem_key, 'fp', 'result')
  if rec[1] == false then
    return nil
  end
  if rec[1] ~= fingerprint then
    return fail('IDEMPOTENCY_CONFLICT', 'this Idempotency-Key was already used with a different request')
  end
  return stored_replay(rec[2])
end

local function remember_result(idem_key, fingerprint, ttl_seconds, result)
  if idem_key == nil then
    return
  end
  redis.call('HSET', idem_key, 'fp', fingerprint, 'result', table.concat(result, ',', 2))
  redis.call('EXPIRE', idem_key, ttl_seconds)
end

-- XADD with optional fields: pairs whose value is nil or '' are left out.
local function append_ledger(ledger_key, pairs_list)
  local args = {}
  for i = 1, #pairs_list, 2 do
    local v = pairs_list[i + 1]
    if v ~= nil and v ~= '' then
      args[#args + 1] = pairs_list[i]
      args[#args + 1] = v
    end
  end
  return redis.call('XADD', ledger_key, '*', unpack(args))
end

-- Per-credential limits: a credential's limits hash (see key_limits.lua) as a
-- table, with its minute windows and UTC day rolled forward to now. Loading
-- writes nothing; limits_save writes the counters back.
local LIMITS_WINDOW = 60000
local LIMITS_DAY = 86400000

local function limits_load(key)
  local now = now_ms()
  local L = {key = key, now = now, minute = math.floor(now / LIMITS_WINDOW), today = math.floor(now / LIMITS_DAY)}
  local f = redis.call('HMGET', key, 'win', 'rq', 'rq0', 'tk', 'tk0', 'spent', 'day', 'spent_day')
  local function num(v)
    return tonumber(v) or 0
  end
  L.win, L.rq, L.rq0, L.tk, L.tk0 = num(f[1]), num(f[2]), num(f[3]), num(f[4]), num(f[5])
  L.spent, L.day, L.spent_day = num(f[6]), num(f[7]), num(f[8])
  if L.minute ~= L.win then
    if L.minute == L.win + 1 then
      L.rq0, L.tk0 = L.rq, L.tk
    else
      L.rq0, L.tk0 = 0, 0
    end
    L.rq, L.tk, L.win = 0, 0, L.minute
  end
  if L.day ~= L.today then
    L.day, L.spent_day = L.today, 0
  end
  return L
end

local function limits_save(L)
  redis.call('HSET', L.key, 'win', fmt(L.win), 'rq', fmt(L.rq), 'rq0', fmt(L.rq0), 'tk', fmt(L.tk), 'tk0', fmt(L.tk0),
    'spent', fmt(L.spent), 'day', fmt(L.day), 'spent_day', fmt(L.spent_day))
end

-- A finished call's real spend and tokens replace its admission reservation
-- (r:<request id>), or are added when it had none; then saved.
local function limits_record(L, request_id, captured, used)
  local res = redis.call('HGET', L.key, 'r:' .. request_id)
  if res then
    local r_amount, r_day, r_tokens, r_minute = string.match(res, '^(%d+)|(%d+)|(%d+)|(%d+)$')
    r_amount, r_day, r_tokens, r_minute = tonumber(r_amount), tonumber(r_day), tonumber(r_tokens), tonumber(r_minute)
    redis.call('HDEL', L.key, 'r:' .. request_id)
    L.spent = math.max(0, L.spent + captured - r_amount)
    if r_day == L.today then
      L.spent_day = math.max(0, L.spent_day + captured - r_amount)
    else
      L.spent_day = L.spent_day + captured
    end
    if r_minute == L.win then
      L.tk = math.max(0, L.tk + used - r_tokens)
    elseif r_minute == L.win - 1 then
      L.tk0 = math.max(0, L.tk0 + used - r_tokens)
    end
  else
    L.spent, L.spent_day, L.tk = L.spent + captured, L.spent_day + captured, L.tk + used
  end
  limits_save(L)
end

-- The spend caps a hold was admitted under (written on its record by hold.lua):
-- lifetime and daily, -1 for none.
local function hold_caps(hold_key)
  local c = redis.call('HMGET', hold_key, 'cap', 'daily_cap')
  return tonumber(c[1]) or -1, tonumber(c[2]) or -1
end

-- The call's reservation r:<request id> as amount, day, tokens, minute (nil if none).
local function limits_reservation(L, request_id)
  local res = redis.call('HGET', L.key, 'r:' .. request_id)
  if not res then
    return nil
  end
  local a, d, t, m = string.match(res, '^(%d+)|(%d+)|(%d+)|(%d+)$')
  return tonumber(a), tonumber(d), tonumber(t), tonumber(m)
end

-- The most this call may spend in total under its credential's caps: what the
-- caps leave once every other call's spend and reservations are counted (this
-- call's own reservation is its to use). nil when the credential has no cap.
local function limits_room(L, request_id, cap, daily_cap)
  if cap < 0 and daily_cap < 0 then
    return nil
  end
  local r_amount, r_day = limits_reservation(L, request_id)
  r_amount = r_amount or 0
  local room = nil
  if cap >= 0 then
    room = cap - (L.spent - r_amount)
  end
  if daily_cap >= 0 then
    local today_reserved = (r_day == L.today) and r_amount or 0
    local daily_room = daily_cap - (L.spent_day - today_reserved)
    room = room and math.min(room, daily_room) or daily_room
  end
  return math.max(room, 0)
end

-- Grow the call's reservation (a stream extending its hold): counted as spend
-- now, so concurrent calls see it; settlement replaces it by the capture.
local function limits_reserve_more(L, request_id, amount)
  local r_amount, r_day, r_tokens, r_minute = limits_reservation(L, request_id)
  if r_amount == nil then
    r_amount, r_day, r_tokens, r_minute = 0, L.today, 0, L.win
  end
  L.spent = L.spent + amount
  if r_day == L.today then
    L.spent_day = L.spent_day + amount
  end
  redis.call('HSET', L.key, 'r:' .. request_id,
    fmt(r_amount + amount) .. '|' .. fmt(r_day) .. '|' .. fmt(r_tokens) .. '|' .. fmt(r_minute))
  limits_save(L)
end

-- The shared shape of top_up, adjust and refund, which move a balance by a
-- signed amount under an idempotency key. KEYS[1] wallet hash, KEYS[2] ledger
-- stream, KEYS[3] idempotency record; ARGV[2] fingerprint, ARGV[3] its TTL.
-- Start: an early answer (the first result replayed, or an error), else the
-- wallet's balance, held and credit_limit. Nothing is written.
local function balance_op_start()
  local replay = idempotent_replay(KEYS[3], ARGV[2])
  if replay then
    return replay
  end
  local balance, held, credit_limit = wallet_state(KEYS[1])
  if balance == nil then
    return fail('WALLET_NOT_FOUND', 'no such wallet')
  end
  return nil, balance, held, credit_limit
end

-- Finish: refuse a balance beyond MAX_BALANCE (before any write), then move
-- the balance, append the ledger entry (its type, amount, the balance and held
-- after, and `fields`) and remember the result under the idempotency key.
local function balance_op_finish(entry_type, amount, balance, held, credit_limit, fields)
  if balance + amount > MAX_BALANCE then
    return nil, fail('BALANCE_LIMIT', 'the balance would exceed ' .. fmt(MAX_BALANCE) .. ' micros')
  end
  balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
  if amount > 0 then
    redis.call('HDEL', KEYS[1], 'note:depleted')  -- funds came in: the next refusal is news again (see note.lua)
  end
  local entry = {'type', entry_type, 'amount', fmt(amount), 'balance', fmt(balance), 'held', fmt(held)}
  for i = 1, #fields do
    entry[#entry + 1] = fields[i]
  end
  local result = {'ok', append_ledger(KEYS[2], entry), fmt(balance), fmt(held), fmt(credit_limit)}
  remember_result(KEYS[3], ARGV[2], ARGV[3], result)
  return result
end

-- Auto top-up (see auto_top_up_rule.lua): a wallet whose rule is on carries
-- `at_threshold` on its hash. A capture that leaves available below it claims
-- the next top-up attempt -- at most one at a time per wallet, across every
-- replica, because the claim is written in the same step: `at_block_until` is
-- pushed AUTO_TOP_UP_CLAIM_MS ahead (the attempt's lease; a claimer that died
-- frees it by then) and `at_attempt` counts the claims. Returns the claimed
-- attempt number as text, or '0'.
local AUTO_TOP_UP_CLAIM_MS = 600000

local function claim_auto_top_up(available)
  local f = redis.call('HMGET', KEYS[1], 'at_threshold', 'at_block_until')
  if not f[1] or available >= tonumber(f[1]) then
    return '0'
  end
  local now = now_ms()
  if f[2] and tonumber(f[2]) > now then
    return '0'
  end
  redis.call('HSET', KEYS[1], 'at_block_until', fmt(now + AUTO_TOP_UP_CLAIM_MS))
  return fmt(redis.call('HINCRBY', KEYS[1], 'at_attempt', 1))
end

-- Close an active hold by capturing `amount` of it (settle, or expire for a
-- checkpoint): KEYS[1] wallet hash, KEYS[2] active holds hash, KEYS[3] the
-- hold's record, KEYS[4] ledger stream. More than the hold is captured only as
-- far as the wallet allows (down to -credit_limit once this hold is released)
-- and, when `cap_room` is given, as far as the credential's spend caps allow
-- (see limits_room); the rest is the shortfall. Appends the 'charge' entry (with `meta`) and
-- returns {'ok', ledger_id, captured, released, shortfall, balance, held,
-- credit_limit, auto_top_up_attempt} and the captured amount (the attempt is
-- '0' unless this capture claimed one: see claim_auto_top_up). The caller
-- marks the record closed.
local function capture_hold(hold_id, hold_amount, amount, meta, cap_room)
  local balance, held, credit_limit = wallet_state(KEYS[1])
  local allowed = balance - (held - hold_amount) + credit_limit
  if cap_room ~= nil then
    allowed = math.min(allowed, cap_room)
  end
  local captured = math.min(amount, math.max(allowed, 0))
  local shortfall = amount - captured
  local released = math.max(hold_amount - captured, 0)
  balance = redis.call('HINCRBY', KEYS[1], 'balance', 0 - captured)  -- never -0: Redis 7.0 refuses it as an integer
  held = redis.call('HINCRBY', KEYS[1], 'held', 0 - hold_amount)
  redis.call('HDEL', KEYS[2], hold_id)
  local id = append_ledger(KEYS[4], {'type', 'charge', 'amount', fmt(0 - captured), 'held_delta', fmt(0 - hold_amount),
    'balance', fmt(balance), 'held', fmt(held), 'hold_id', hold_id, 'requested', fmt(amount),
    'shortfall', fmt(shortfall), 'meta', meta})
  local attempt = claim_auto_top_up(balance - held + credit_limit)
  return {'ok', id, fmt(captured), fmt(released), fmt(shortfall), fmt(balance), fmt(held), fmt(credit_limit), attempt}, captured
end

-- Give a whole active hold back (release, or expire with nothing checkpointed):
-- keys as for capture_hold; `entry_type` is 'release' or 'expire'.
local function release_hold(hold_id, hold_amount, entry_type, reason)
  local balance, held, credit_limit = wallet_state(KEYS[1])
  held = redis.call('HINCRBY', KEYS[1], 'held', 0 - hold_amount)  -- never -0 (see capture_hold)
  redis.call('HDEL', KEYS[2], hold_id)
  local id = append_ledger(KEYS[4], {'type', entry_type, 'amount', '0', 'held_delta', fmt(0 - hold_amount),
    'balance', fmt(balance), 'held', fmt(held), 'hold_id', hold_id, 'reason', reason})
  return {'ok', id, '0', fmt(hold_amount), '0', fmt(balance), fmt(held), fmt(credit_limit)}
end
