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

-- Every field of a wallet hash in one read (HGETALL), as a table by name, or
-- nil when it does not exist. A script that reads several of the wallet's
-- fields reads them here once. What things cost in a script (Redis 7.0,
-- counted with callgrind by bench/lua_cost.py): a Redis call ~5,000
-- instructions, plus ~1,200-2,300 for each argument or element of its reply;
-- fmt() ~2,300; each function this prelude defines ~500 on every run.
local function wallet_load(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil
  end
  local w = {}
  for i = 1, #flat, 2 do
    w[flat[i]] = flat[i + 1]
  end
  return w
end

-- The `fields` of a hold's record, in one HMGET, as a table by name (an
-- absent field, or every field when there is no record: nil). A script names
-- just the fields it needs: each costs (see wallet_load), and reading the
-- whole record with HGETALL costs more than two HMGETs.
local function hold_load(key, fields)
  local v = redis.call('HMGET', key, unpack(fields))
  local h = {}
  for i = 1, #fields do
    if v[i] then
      h[fields[i]] = v[i]
    end
  end
  return h
end

-- What capture_hold and release_hold read of the record (see budget_close, hold_caps, hold_forget).
local HOLD_CLOSE_FIELDS = {'status', 'amount', 'cap', 'daily_cap', 'bud_limit', 'bud_period', 'bud_reserved', 'checkpoint'}

-- HOLD_CLOSE_FIELDS and `more`, as one list for hold_load.
local function hold_close_fields(more)
  local fields = {unpack(HOLD_CLOSE_FIELDS)}
  for i = 1, #more do
    fields[#fields + 1] = more[i]
  end
  return fields
end

-- Drop from a closing hold's record (`h`, as hold_load read it with
-- HOLD_CLOSE_FIELDS) what only an active hold needs: its metadata (the closing
-- entry carries it), credential, caps, budget terms and checkpoint. What stays,
-- a day, is what replays and a job's view read: status, amount, requested,
-- created_ms, expires_ms, captured, description and the close's result
-- (264 bytes a call's record, from 360).
local function hold_forget(h)
  local gone = {'meta', 'credential', 'request_id', 'cap', 'daily_cap'}
  if h.bud_limit then
    gone[#gone + 1], gone[#gone + 2], gone[#gone + 3] = 'bud_limit', 'bud_period', 'bud_reserved'
  end
  if h.checkpoint then
    gone[#gone + 1], gone[#gone + 2], gone[#gone + 3] = 'checkpoint', 'checkpoint_tokens', 'checkpoint_meta'
  end
  redis.call('HDEL', KEYS[3], unpack(gone))
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
-- Every entry of a sandbox wallet (KEYS[1], the wallet hash, in every script
-- that appends: see open.lua) says `is_simulated`, so no report can take it for
-- money, and every entry of a wallet in an asset other than USD names it.
-- `w`: the wallet's fields when the script has loaded them (wallet_load);
-- neither field ever changes after open.lua, so a copy is as good as a read.
local function append_ledger(ledger_key, pairs_list, w)
  local args = {}
  local simulated, asset
  if w then
    simulated, asset = w.simulated, w.asset
  else
    local f = redis.call('HMGET', KEYS[1], 'simulated', 'asset')
    simulated, asset = f[1], f[2]
  end
  if simulated == '1' then
    args[#args + 1], args[#args + 2] = 'is_simulated', 'true'
  end
  if asset then
    args[#args + 1], args[#args + 2] = 'asset', asset
  end
  for i = 1, #pairs_list, 2 do
    local v = pairs_list[i + 1]
    if v ~= nil and v ~= '' then
      args[#args + 1] = pairs_list[i]
      args[#args + 1] = v
    end
  end
  return redis.call('XADD', ledger_key, '*', unpack(args))
end

-- Grants. A wallet's balance is the sum of its grants: money with a kind
-- ('purchased', 'promotional' or the operator's own), a priority (0 is spent
-- first, as in Stripe's credit grants), an optional expiry and an age. Each is
-- a field of the wallet hash, 'grant:<id>' = 'remaining|priority|expires_ms|seq|kind|state'
-- (expires_ms 0: never; state 'live' or 'expired'). Top-ups and positive
-- adjustments go to the one grant 'purchased' (priority 50, no expiry); the
-- overdraft of a postpaid wallet is the grant 'debt' (remaining <= 0), never
-- drawn from and repaid first by purchased money.
-- Draw order: expired remainders first, then priority, then soonest expiry
-- (none: last), then oldest. An expired grant keeps only what live holds had
-- reserved of it (held is covered by the grants in draw order), so money a
-- call was admitted on is never taken from under it, and no new hold can use
-- it (it is inside `held`). `grants_due` on the wallet hash is when a sweep is
-- next needed (0 while expired remainders wait for their holds; absent: never).
local GRANT_PURCHASED = 'purchased'

local function grant_before(a, b)
  local ax, bx = a.state == 'expired', b.state == 'expired'
  if ax ~= bx then
    return ax
  end
  if a.priority ~= b.priority then
    return a.priority < b.priority
  end
  local ae = a.expires == 0 and math.huge or a.expires
  local be = b.expires == 0 and math.huge or b.expires
  if ae ~= be then
    return ae < be
  end
  return a.seq < b.seq
end

local function grant_text(g)
  return fmt(g.remaining) .. '|' .. fmt(g.priority) .. '|' .. fmt(g.expires) .. '|' .. fmt(g.seq) .. '|' .. g.kind .. '|' .. g.state
end

-- The wallet's grants, in draw order, as {list, debt, by_id, dirty, w}: `w` is
-- the wallet's fields as loaded (wallet_load; pass them when already read),
-- which the grant functions keep up to date as they write. A wallet from
-- before grants existed (no grants_v) gets its balance as the purchased
-- grant, or as its debt, the first time a script loads it.
local function grants_load(wallet_key, w)
  w = w or wallet_load(wallet_key) or {}
  local G = {key = wallet_key, list = {}, debt = nil, by_id = {}, dirty = {}, w = w}
  for f, v in pairs(w) do
    if string.sub(f, 1, 6) == 'grant:' then
      local r, p, e, s, k, st = string.match(v, '^(%-?%d+)|(%d+)|(%d+)|(%d+)|([^|]*)|(%a+)$')
      local g = {id = string.sub(f, 7), remaining = tonumber(r), priority = tonumber(p), expires = tonumber(e),
        seq = tonumber(s), kind = k, state = st}
      G.by_id[g.id] = g
      if g.id == 'debt' then
        G.debt = g
      else
        G.list[#G.list + 1] = g
      end
    end
  end
  local versioned, balance = w.grants_v ~= nil, tonumber(w.balance) or 0
  if not versioned then
    redis.call('HSET', wallet_key, 'grants_v', '1')
    w.grants_v = '1'
    if balance ~= 0 then
      local g = {id = balance > 0 and GRANT_PURCHASED or 'debt', remaining = balance, priority = 50, expires = 0,
        seq = 0, kind = balance > 0 and 'purchased' or 'debt', state = 'live'}
      G.by_id[g.id] = g
      G.dirty[g.id] = g
      if balance > 0 then
        G.list[1] = g
      else
        G.debt = g
      end
    end
  end
  table.sort(G.list, grant_before)
  return G
end

-- Write the grants that changed; `also` (optional): more field/value pairs of
-- the wallet hash to write in the same HSET.
local function grants_save(G, also)
  local set = {}
  for id, g in pairs(G.dirty) do
    if g.remaining == 0 and (g.state == 'expired' or id == 'debt') then
      redis.call('HDEL', G.key, 'grant:' .. id)  -- spent to the end: nothing can return to it
      G.w['grant:' .. id] = nil
    else
      set[#set + 1] = 'grant:' .. id
      set[#set + 1] = grant_text(g)
      G.w['grant:' .. id] = set[#set]
    end
  end
  for i = 1, #(also or {}), 2 do
    set[#set + 1], set[#set + 2] = also[i], also[i + 1]
    G.w[also[i]] = also[i + 1]
  end
  if #set > 0 then
    redis.call('HSET', G.key, unpack(set))
  end
  G.dirty = {}
end

-- The grant `id`, created (live, empty) with these terms when it does not exist.
local function grant_open(G, id, kind, priority, expires)
  local g = G.by_id[id]
  if g == nil then
    g = {id = id, remaining = 0, priority = priority, expires = expires,
      seq = redis.call('HINCRBY', G.key, 'grant_seq', 1), kind = kind, state = 'live'}
    G.by_id[id] = g
    if id == 'debt' then
      G.debt = g
    else
      G.list[#G.list + 1] = g
      table.sort(G.list, grant_before)
    end
  end
  return g
end

-- Take `amount` (>= 0) from the grants in draw order (the grant `prefer`
-- first, when given); what they cannot cover deepens the debt. Expired
-- remainders are taken only by a hold's capture (`from_held`): they are
-- reserved for holds. Returns the draws, 'id:amount,...' ('' for none).
local function grants_debit(G, amount, from_held, prefer)
  local draws, left = {}, amount
  local function take(g)
    local t = math.min(left, g.remaining)
    if t > 0 then
      g.remaining = g.remaining - t
      left = left - t
      G.dirty[g.id] = g
      draws[#draws + 1] = g.id .. ':' .. fmt(t)
    end
  end
  if prefer and G.by_id[prefer] and G.by_id[prefer].state == 'live' and prefer ~= 'debt' then
    take(G.by_id[prefer])
  end
  for _, g in ipairs(G.list) do
    if left == 0 then
      break
    end
    if from_held or g.state ~= 'expired' then
      take(g)
    end
  end
  if left > 0 then
    local d = grant_open(G, 'debt', 'debt', 100, 0)
    d.remaining = d.remaining - left
    G.dirty.debt = d
    draws[#draws + 1] = 'debt:' .. fmt(left)
  end
  return table.concat(draws, ',')
end

-- Add `amount` (>= 0) to the grant `id` (created with these terms if new);
-- purchased money repays the debt first. Returns the credits, 'id:amount,...'.
local function grants_credit(G, amount, id, kind, priority, expires)
  local parts, left = {}, amount
  local d = G.debt
  if id == GRANT_PURCHASED and d ~= nil and d.remaining < 0 and left > 0 then
    local r = math.min(left, -d.remaining)
    d.remaining = d.remaining + r
    left = left - r
    G.dirty.debt = d
    parts[#parts + 1] = 'debt:' .. fmt(r)
  end
  if left > 0 then
    local g = grant_open(G, id, kind, priority, expires)
    g.remaining = g.remaining + left
    G.dirty[id] = g
    parts[#parts + 1] = id .. ':' .. fmt(left)
  end
  return table.concat(parts, ',')
end

-- Give `amount` back to the grants a charge drew from (`draws`, as grants_debit
-- wrote them; `returned(id)` says how much of each earlier refunds gave back),
-- last drawn first. A part whose grant has expired (or is gone) is not given
-- back to it: it lapses, and is returned as `lapsed` for a grant_expired entry.
-- Returns the credits ('id:amount,...'), what lapsed, and per grant what
-- this refund returned (for the caller to count). A charge that recorded no
-- draws (made before grants) is refunded as purchased money.
local function grants_refund(G, amount, draws, returned)
  local drawn = {}
  for id, a in string.gmatch(draws or '', '([^:,]+):(%d+)') do
    drawn[#drawn + 1] = {id = id, amount = tonumber(a)}
  end
  if #drawn == 0 then
    return grants_credit(G, amount, GRANT_PURCHASED, 'purchased', 50, 0), 0, {}
  end
  local parts, lapsed, per, left = {}, 0, {}, amount
  for i = #drawn, 1, -1 do
    if left == 0 then
      break
    end
    local d = drawn[i]
    local r = math.min(left, math.max(d.amount - returned(d.id) - (per[d.id] or 0), 0))
    if r > 0 then
      left = left - r
      per[d.id] = (per[d.id] or 0) + r
      local g = G.by_id[d.id]
      if d.id == 'debt' then
        g = grant_open(G, 'debt', 'debt', 100, 0)
        g.remaining = g.remaining + r
        G.dirty.debt = g
        parts[#parts + 1] = 'debt:' .. fmt(r)
      elseif g ~= nil and g.state == 'live' then
        g.remaining = g.remaining + r
        G.dirty[g.id] = g
        parts[#parts + 1] = g.id .. ':' .. fmt(r)
      else
        lapsed = lapsed + r
      end
    end
  end
  if left > 0 then  -- cannot happen when the refund is within the charge; kept whole rather than lost
    parts[#parts + 1] = grants_credit(G, left, GRANT_PURCHASED, 'purchased', 50, 0)
  end
  return table.concat(parts, ','), lapsed, per
end

-- Expire what is left of every grant past its expiry, except what live holds
-- reserved of it (see above), with one 'grant_expired' entry each; then write
-- the grants and when the next sweep is due. Returns the balance after.
local function grants_sweep(G, ledger_key, held, balance)
  local now = now_ms()
  local covered, due = 0, nil
  for _, g in ipairs(G.list) do
    local reserved = math.max(0, math.min(g.remaining, held - covered))
    if g.expires > 0 and g.expires <= now then
      if g.remaining > reserved then
        local lapse = g.remaining - reserved
        g.remaining = reserved
        balance = redis.call('HINCRBY', G.key, 'balance', 0 - lapse)
        G.w.balance = fmt(balance)
        append_ledger(ledger_key, {'type', 'grant_expired', 'amount', fmt(0 - lapse), 'balance', fmt(balance),
          'held', fmt(held), 'grant_id', g.id, 'kind', g.kind, 'reserved', fmt(reserved)}, G.w)
        G.dirty[g.id] = g
      end
      if g.state ~= 'expired' then
        g.state = 'expired'
        G.dirty[g.id] = g
      end
      if g.remaining > 0 then
        due = 0
      end
    elseif g.expires > 0 and (due == nil or g.expires < due) then
      due = g.expires
    end
    covered = covered + g.remaining
  end
  grants_save(G)
  table.sort(G.list, grant_before)
  if due == nil then
    redis.call('HDEL', G.key, 'grants_due')
    G.w.grants_due = nil
  else
    redis.call('HSET', G.key, 'grants_due', fmt(due))
    G.w.grants_due = fmt(due)
  end
  return balance
end

-- Whether a wallet's `grants_due` field (false or nil: absent) says a grant is to expire now.
local function due_now(due)
  return due and tonumber(due) <= now_ms()
end

-- Whether the wallet has a grant to expire now (one HGET: the common answer is no).
local function grants_due(wallet_key)
  return due_now(redis.call('HGET', wallet_key, 'grants_due'))
end

-- Sweep the wallet's grants if one is due; returns the balance after (and the
-- grants, loaded, or nil when nothing was due).
local function grants_sweep_if_due(wallet_key, ledger_key, held, balance)
  if not grants_due(wallet_key) then
    return balance, nil
  end
  local G = grants_load(wallet_key)
  return grants_sweep(G, ledger_key, held, balance), G
end

-- grants_sweep_if_due for grants already loaded (grants_load).
local function grants_sweep_loaded_if_due(G, ledger_key, held, balance)
  if not due_now(G.w.grants_due) then
    return balance
  end
  return grants_sweep(G, ledger_key, held, balance)
end

-- Budgets: an end user's spend cap per calendar period, which the proxy names
-- ('2026-12', '2026-12-03': proxy/budgets.py). The wallet hash keeps
-- `bud_period`, `bud_spent` (captured in it) and `bud_held` (what live holds
-- admitted in it reserved); a hold admitted under a budget keeps `bud_limit`,
-- `bud_period` and `bud_reserved`. A new period starts both counts at 0: a
-- hold from the period before then counts its capture (not its reservation)
-- in the new one.
-- `w` (optional): the wallet's fields as loaded (wallet_load).
local function budget_state(w)
  local f = w and {w.bud_period, w.bud_spent, w.bud_held} or redis.call('HMGET', KEYS[1], 'bud_period', 'bud_spent', 'bud_held')
  return f[1] or '', tonumber(f[2]) or 0, tonumber(f[3]) or 0
end

-- The wallet's budget counts in `period`, starting it when it is new.
local function budget_roll(period)
  local current, spent, held = budget_state()
  if current ~= period then
    redis.call('HSET', KEYS[1], 'bud_period', period, 'bud_spent', '0', 'bud_held', '0')
    return 0, 0
  end
  return spent, held
end

-- A hold's budget terms (`h`, its record as hold_load reads it): limit (nil: none), period, reserved.
local function budget_of_hold(h)
  return tonumber(h.bud_limit), h.bud_period or '', tonumber(h.bud_reserved) or 0
end

-- What the closing hold `h` may capture under its budget (nil: no budget), and
-- the function that counts the capture once made; `w`: the wallet's fields.
local function budget_close(h, w)
  local limit, hold_period, reserved = budget_of_hold(h)
  if limit == nil then
    return nil, function(_) end
  end
  local period, spent, held = budget_state(w)
  local own = (hold_period == period) and reserved or 0
  local room = math.max(limit - spent - (held - own), 0)
  return room, function(captured)
    w.bud_spent, w.bud_held = fmt(spent + captured), fmt(math.max(held - own, 0))
    redis.call('HSET', KEYS[1], 'bud_spent', w.bud_spent, 'bud_held', w.bud_held)
  end
end

-- Per-credential limits: a credential's limits hash (see key_limits.lua) as a
-- table, with its minute windows and UTC day rolled forward to now. Loading
-- writes nothing; limits_save writes the counters back. With `request_id`,
-- that call's reservation (r:<request id>) is read in the same HMGET.
local LIMITS_WINDOW = 60000
local LIMITS_DAY = 86400000

local function limits_load(key, request_id)
  local now = now_ms()
  local L = {key = key, now = now, minute = math.floor(now / LIMITS_WINDOW), today = math.floor(now / LIMITS_DAY)}
  local f
  if request_id then
    f = redis.call('HMGET', key, 'win', 'rq', 'rq0', 'tk', 'tk0', 'spent', 'day', 'spent_day', 'r:' .. request_id)
    L.res_id, L.res = request_id, f[9]
  else
    f = redis.call('HMGET', key, 'win', 'rq', 'rq0', 'tk', 'tk0', 'spent', 'day', 'spent_day')
  end
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
    L.rolled = true
  end
  if L.day ~= L.today then
    L.day, L.spent_day = L.today, 0
    L.rolled = true
  end
  return L
end

-- Write the counters back; `spent_only`: the caller moved only spend and tokens
-- (a close or a growth), so unless a window rolled the rest is as it was read
-- and is left out (half the HSET; see wallet_load for what each field costs).
local function limits_save(L, spent_only)
  if spent_only and not L.rolled then
    redis.call('HSET', L.key, 'tk', fmt(L.tk), 'tk0', fmt(L.tk0), 'spent', fmt(L.spent), 'spent_day', fmt(L.spent_day))
    return
  end
  redis.call('HSET', L.key, 'win', fmt(L.win), 'rq', fmt(L.rq), 'rq0', fmt(L.rq0), 'tk', fmt(L.tk), 'tk0', fmt(L.tk0),
    'spent', fmt(L.spent), 'day', fmt(L.day), 'spent_day', fmt(L.spent_day))
end

-- The call's reservation r:<request id> as amount, day, tokens, minute (nil if
-- none); read with the limits when limits_load was given this request id.
local function limits_reservation(L, request_id)
  local res
  if L.res_id == request_id then
    res = L.res
  else
    res = redis.call('HGET', L.key, 'r:' .. request_id)
  end
  if not res then
    return nil
  end
  local a, d, t, m = string.match(res, '^(%d+)|(%d+)|(%d+)|(%d+)$')
  return tonumber(a), tonumber(d), tonumber(t), tonumber(m)
end

-- A finished call's real spend and tokens replace its admission reservation
-- (r:<request id>), or are added when it had none; then saved.
local function limits_record(L, request_id, captured, used)
  local r_amount, r_day, r_tokens, r_minute = limits_reservation(L, request_id)
  if r_amount then
    redis.call('HDEL', L.key, 'r:' .. request_id)
    if L.res_id == request_id then
      L.res = false
    end
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
  limits_save(L, true)
end

-- A finished call's spend on a credential with no limits at all (no rate limit,
-- no cap: admitted with no reservation), counted in its lifetime and day spend so
-- that a cap set later counts it, and nothing else: no token or request window,
-- which only a rate limit reads (one set later counts from the minute it is set).
-- About half what limits_load and limits_record cost (bench/lua_cost.py). A call
-- whose hold grew under the credential (a stream: extend.lua reserves the growth
-- as r:<request id>) has its reservation replaced by limits_record, as any other.
local function limits_record_spend(key, request_id, captured, used)
  local f = redis.call('HMGET', key, 'spent', 'day', 'spent_day', 'r:' .. request_id)
  if f[4] then
    limits_record(limits_load(key, request_id), request_id, captured, used)
    return
  end
  local today = math.floor(now_ms() / LIMITS_DAY)
  local spent_day = (tonumber(f[2]) == today) and (tonumber(f[3]) or 0) or 0
  redis.call('HSET', key, 'spent', fmt((tonumber(f[1]) or 0) + captured), 'day', fmt(today),
    'spent_day', fmt(spent_day + captured))
end

-- The spend caps a hold was admitted under (written on its record by hold.lua;
-- `h` as hold_load reads it): lifetime and daily, -1 for none.
local function hold_caps(h)
  return tonumber(h.cap) or -1, tonumber(h.daily_cap) or -1
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
  local res = fmt(r_amount + amount) .. '|' .. fmt(r_day) .. '|' .. fmt(r_tokens) .. '|' .. fmt(r_minute)
  redis.call('HSET', L.key, 'r:' .. request_id, res)
  L.res_id, L.res = request_id, res
  limits_save(L, true)
end

-- The shared shape of top_up, adjust and refund, which move a balance by a
-- signed amount under an idempotency key. KEYS[1] wallet hash, KEYS[2] ledger
-- stream, KEYS[3] idempotency record; ARGV[2] fingerprint, ARGV[3] its TTL.
-- Start: an early answer (the first result replayed, or an error), else the
-- wallet's balance, held and credit_limit, after expiring any grant that is
-- due (a complete step of its own: nothing else is written).
local function balance_op_start()
  local replay = idempotent_replay(KEYS[3], ARGV[2])
  if replay then
    return replay
  end
  local balance, held, credit_limit = wallet_state(KEYS[1])
  if balance == nil then
    return fail('WALLET_NOT_FOUND', 'no such wallet')
  end
  balance = grants_sweep_if_due(KEYS[1], KEYS[2], held, balance)
  return nil, balance, held, credit_limit
end

-- Finish: refuse a balance beyond MAX_BALANCE (before any write), then move
-- the balance and its grants, append the ledger entry (its type, amount, the
-- balance and held after, the grants moved, and `fields`) and remember the
-- result under the idempotency key. `grants_fn(G, amount)`, when given, moves
-- the grants and returns what it wrote and what lapsed at once (a refund to an
-- expired grant); by default a credit goes to the purchased grant and a debit
-- is drawn in order (from the grant `prefer` first, when given).
local function balance_op_finish(entry_type, amount, balance, held, credit_limit, fields, grants_fn, prefer)
  if balance + amount > MAX_BALANCE then
    return nil, fail('BALANCE_LIMIT', 'the balance would exceed ' .. fmt(MAX_BALANCE) .. ' micros')
  end
  local G = grants_load(KEYS[1])
  local moved, lapsed = '', 0
  if grants_fn then
    moved, lapsed = grants_fn(G, amount)
  elseif amount > 0 then
    moved = grants_credit(G, amount, GRANT_PURCHASED, 'purchased', 50, 0)
  elseif amount < 0 then
    moved = grants_debit(G, 0 - amount, false, prefer)
  end
  balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
  if amount > 0 then
    redis.call('HDEL', KEYS[1], 'note:depleted')  -- funds came in: the next refusal is news again (see note.lua)
  end
  local entry = {'type', entry_type, 'amount', fmt(amount), 'balance', fmt(balance), 'held', fmt(held), 'grants', moved}
  for i = 1, #fields do
    entry[#entry + 1] = fields[i]
  end
  local id = append_ledger(KEYS[2], entry)
  if lapsed > 0 then
    balance = redis.call('HINCRBY', KEYS[1], 'balance', 0 - lapsed)
    append_ledger(KEYS[2], {'type', 'grant_expired', 'amount', fmt(0 - lapsed), 'balance', fmt(balance),
      'held', fmt(held), 'reason', 'refunded to a grant that has expired', 'refund_id', id})
  end
  grants_save(G)
  local result = {'ok', id, fmt(balance), fmt(held), fmt(credit_limit)}
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

local function claim_auto_top_up(available, w)
  local f = w and {w.at_threshold, w.at_block_until} or redis.call('HMGET', KEYS[1], 'at_threshold', 'at_block_until')
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
-- hold's record (`h`, as hold_load read it), KEYS[4] ledger stream. More than
-- the hold is captured only as far as the wallet allows (down to
-- -credit_limit once this hold is released) and, when `cap_room` is given, as
-- far as the credential's spend caps allow (see limits_room) and its budget
-- (see budget_close); the rest is the shortfall. Appends the 'charge' entry
-- (with `meta`) and returns {'ok', ledger_id, captured, released, shortfall,
-- balance, held, credit_limit, auto_top_up_attempt} and the captured amount
-- (the attempt is '0' unless this capture claimed one: see
-- claim_auto_top_up). The caller marks the record closed.
-- The wallet is read once (grants_load) and its balance, held and grants
-- written in one HSET: nothing else in the script moves them in between.
local function capture_hold(hold_id, h, amount, meta, cap_room)
  local hold_amount = tonumber(h.amount)
  local G = grants_load(KEYS[1])
  local w = G.w
  local balance, held, credit_limit = tonumber(w.balance), tonumber(w.held), tonumber(w.credit_limit)
  balance = grants_sweep_loaded_if_due(G, KEYS[4], held, balance)
  local allowed = balance - (held - hold_amount) + credit_limit
  if cap_room ~= nil then
    allowed = math.min(allowed, cap_room)
  end
  local budget_room, budget_count = budget_close(h, w)
  if budget_room ~= nil then
    allowed = math.min(allowed, budget_room)
  end
  local captured = math.min(amount, math.max(allowed, 0))
  local shortfall = amount - captured
  local released = math.max(hold_amount - captured, 0)
  local draws = grants_debit(G, captured, true)
  budget_count(captured)
  balance, held = balance - captured, held - hold_amount
  redis.call('HDEL', KEYS[2], hold_id)
  local id = append_ledger(KEYS[4], {'type', 'charge', 'amount', fmt(0 - captured), 'held_delta', fmt(0 - hold_amount),
    'balance', fmt(balance), 'held', fmt(held), 'hold_id', hold_id, 'requested', fmt(amount),
    'shortfall', fmt(shortfall), 'grants', draws, 'meta', meta}, w)
  hold_forget(h)  -- the charge's meta says what the call was; the record stays only for replays
  grants_save(G, {'balance', fmt(balance), 'held', fmt(held)})
  balance = grants_sweep_loaded_if_due(G, KEYS[4], held, balance)  -- what this hold had reserved of an expired grant lapses
  local attempt = claim_auto_top_up(balance - held + credit_limit, w)
  return {'ok', id, fmt(captured), fmt(released), fmt(shortfall), fmt(balance), fmt(held), fmt(credit_limit), attempt}, captured
end

-- Give a whole active hold back (release, or expire with nothing checkpointed):
-- keys and `h` as for capture_hold; `entry_type` is 'release' or 'expire'. The
-- entry carries `meta` when given, else the hold's own (what the call was:
-- hold.lua writes no entry), which then leaves the record, kept only for replays.
local function release_hold(hold_id, h, entry_type, reason, meta)
  local hold_amount = tonumber(h.amount)
  local w = wallet_load(KEYS[1])
  local balance, held, credit_limit = tonumber(w.balance), tonumber(w.held), tonumber(w.credit_limit)
  local kept = h.meta
  if meta == nil or meta == '' then
    meta = kept
  end
  local _, budget_count = budget_close(h, w)
  budget_count(0)
  held = held - hold_amount
  w.held = fmt(held)
  redis.call('HSET', KEYS[1], 'held', w.held)
  redis.call('HDEL', KEYS[2], hold_id)
  local id = append_ledger(KEYS[4], {'type', entry_type, 'amount', '0', 'held_delta', fmt(0 - hold_amount),
    'balance', fmt(balance), 'held', fmt(held), 'hold_id', hold_id, 'reason', reason, 'meta', meta}, w)
  hold_forget(h)
  if due_now(w.grants_due) then  -- see capture_hold
    balance = grants_sweep(grants_load(KEYS[1], w), KEYS[4], held, balance)
  end
  return {'ok', id, '0', fmt(hold_amount), '0', fmt(balance), fmt(held), fmt(credit_limit)}
end
