-- hold: reserve funds for a call before it is forwarded.
-- KEYS[1] wallet hash   KEYS[2] active holds hash (hold id -> amount)
-- KEYS[3] this hold's record   KEYS[4] ledger stream
-- ARGV[1] hold id   ARGV[2] amount (micros, >= 0)   ARGV[3] ttl (ms, > 0)   ARGV[4] metadata JSON
-- ARGV[5], ARGV[6] (optional) the credential that made the call and its request
-- id, kept on the hold so that expiring it also gives back that credential's
-- spend reservation; ARGV[7], ARGV[8] (optional) its lifetime and daily spend
-- caps (-1: none), kept on the hold so that extending, settling and expiring it
-- never take the credential past them (a -1 is not written: an absent cap reads as none).
-- ARGV[9], ARGV[10] (optional) the end user's budget for the period and the
-- period's name (see "Budgets" in _prelude.lua): the hold is refused with
-- BUDGET_EXCEEDED when it does not fit what the budget leaves, else reserved
-- against it, and its growth and close count there too.
-- KEYS[5], ARGV[11], ARGV[12] (optional) the end user's key hash, the id of the
-- key the call was admitted with and the stamp the caller's cached copy of it
-- has: the hold is refused with STALE_CREDENTIAL unless that is still the key's
-- stamp (every change of a key replaces it, see proxy/store/accounts.py), so a
-- revoked or changed key never pays for a call from a stale cache.
-- Returns {'ok'|'replay', hold_id, amount, expires_ms, balance, held, credit_limit}.
-- No ledger entry: a hold moves no money, and its record says all it is
-- (amount, expiry, and `meta`, which a release or expire entry carries unless
-- given its own: see release_hold). The close writes the one entry a call
-- leaves (charge, release or expire, with held_delta = minus the hold).
-- Keep `meta` short (a request id): a field over 64 bytes turns the record
-- from a listpack into a hash table, twice its size for the day it is kept.
-- The hold id is the idempotency key: the same id and amount (as first asked
-- for, however the hold grew since) replays the first result; the same id
-- with another amount is an IDEMPOTENCY_CONFLICT.
-- Keeps: a hold is granted only if amount <= available (balance - held +
-- credit_limit), so available never goes below 0; held == sum of active holds;
-- a grant past its expiry is expired first (see grants_sweep), so it funds no new hold;
-- a budget's spent + held never exceeds its limit.
local amount = int_arg(ARGV[2], 0, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'the hold amount must be an integer between 0 and ' .. fmt(MAX_AMOUNT))
end
local ttl = int_arg(ARGV[3], 1, 30 * 24 * 3600 * 1000)
if ttl == nil then
  return fail('INVALID_REQUEST', 'ttl must be a positive number of milliseconds')
end
local budget_limit = nil
if ARGV[9] and ARGV[9] ~= '' then
  budget_limit = int_arg(ARGV[9], 0, MAX_AMOUNT)
  if budget_limit == nil or not ARGV[10] or not string.match(ARGV[10], '^[%w:-]+$') then
    return fail('INVALID_REQUEST', 'a budget needs a limit in micros and a period name')
  end
end
local existing = redis.call('HMGET', KEYS[3], 'requested', 'expires_ms', 'amount')
if existing[3] ~= false then
  -- Compared with the amount first asked for: the hold may have grown since.
  local first = existing[1] or existing[3]
  if tonumber(first) ~= amount then
    return fail('IDEMPOTENCY_CONFLICT', 'hold ' .. ARGV[1] .. ' exists with another amount')
  end
  local b, h, c = wallet_state(KEYS[1])
  return {'replay', ARGV[1], first, existing[2], fmt(b), fmt(h), fmt(c)}
end
if ARGV[11] and ARGV[11] ~= '' then
  local stamp = redis.call('HGET', KEYS[5], 'v:' .. ARGV[11]) or ''
  if stamp ~= ARGV[12] then
    return fail('STALE_CREDENTIAL', 'key ' .. ARGV[11] .. ' changed since it was looked up')
  end
end
local w = redis.call('HMGET', KEYS[1], 'balance', 'held', 'credit_limit', 'grants_due')
if w[1] == false then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
local balance, held, credit_limit = tonumber(w[1]), tonumber(w[2]), tonumber(w[3])
if due_now(w[4]) then  -- an expired grant is spent by no new call
  balance = grants_sweep(grants_load(KEYS[1]), KEYS[4], held, balance)
end
local available = balance - held + credit_limit
if amount > available then
  return fail('INSUFFICIENT_FUNDS', 'this call needs ' .. fmt(amount) .. ' micros and ' .. fmt(available) .. ' are available')
end
if budget_limit ~= nil then
  local spent, budget_held = budget_roll(ARGV[10])
  if spent + budget_held + amount > budget_limit then
    return fail('BUDGET_EXCEEDED', 'this call needs ' .. fmt(amount) .. ' micros and the budget for ' .. ARGV[10] ..
      ' leaves ' .. fmt(math.max(budget_limit - spent - budget_held, 0)))
  end
  redis.call('HSET', KEYS[1], 'bud_held', fmt(budget_held + amount))
end
local now = now_ms()
local expires = now + ttl
held = redis.call('HINCRBY', KEYS[1], 'held', amount)
redis.call('HSET', KEYS[2], ARGV[1], amount)
-- The whole record in one HSET (see hold_load for what a Redis call costs).
local amount_text = fmt(amount)
local record = {'status', 'active', 'amount', amount_text, 'requested', amount_text, 'created_ms', fmt(now),
  'expires_ms', fmt(expires)}
if ARGV[4] ~= '' then
  record[#record + 1], record[#record + 2] = 'meta', ARGV[4]
end
if budget_limit ~= nil then
  record[#record + 1], record[#record + 2] = 'bud_limit', fmt(budget_limit)
  record[#record + 1], record[#record + 2] = 'bud_period', ARGV[10]
  record[#record + 1], record[#record + 2] = 'bud_reserved', amount_text
end
if ARGV[5] and ARGV[5] ~= '' then
  record[#record + 1], record[#record + 2] = 'credential', ARGV[5]
  record[#record + 1], record[#record + 2] = 'request_id', ARGV[6]
  -- A cap of -1 (none) is what an absent field reads as (hold_caps): only a real one is kept.
  if ARGV[7] and ARGV[7] ~= '-1' then
    record[#record + 1], record[#record + 2] = 'cap', ARGV[7]
  end
  if ARGV[8] and ARGV[8] ~= '-1' then
    record[#record + 1], record[#record + 2] = 'daily_cap', ARGV[8]
  end
end
redis.call('HSET', KEYS[3], unpack(record))
return {'ok', ARGV[1], fmt(amount), fmt(expires), fmt(balance), fmt(held), fmt(credit_limit)}
