-- Prelude: prepended by proxy/store.py to every wallet script; never run alone.
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
  local out = {'replay'}
  for part in string.gmatch(rec[2], '[^,]+') do
    out[#out + 1] = part
  end
  return out
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
