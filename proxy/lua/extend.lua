-- extend: keep an active hold covering its call while it runs: grow it (a
-- stream that has spent what it held asks for more before relaying further),
-- push back its expiry (a live call is never taken by the reaper), and
-- checkpoint the usage counted so far (what the reaper charges if the proxy
-- dies: see expire.lua).
-- KEYS[1] wallet hash   KEYS[2] active holds hash   KEYS[3] this hold's record
-- KEYS[4] ledger stream
-- ARGV[1] hold id   ARGV[2] additional amount (micros, >= 0; 0 only refreshes the
--         expiry and the checkpoint, and writes no ledger entry)   ARGV[3] new ttl from now (ms, > 0)
-- ARGV[4] idempotency step (the hold's amount the caller saw; a retried
--         extension whose step already passed replays instead of growing twice)
-- ARGV[5], ARGV[6], ARGV[7] (optional) checkpoint: the price of the usage
--         counted so far (micros), its tokens, and the charge metadata JSON.
--         A checkpoint below the one recorded is ignored (a late retry).
-- Optional: KEYS[5] the limits hash of the credential recorded on the hold: a
-- growth is then also reserved against its spend caps (see hold.lua), in the
-- same step, so concurrent streams can never take it past a cap.
-- ARGV[8] (optional) the name of the budget period now: a hold admitted under a
-- budget (hold.lua) grows only as far as that budget leaves (BUDGET_EXCEEDED).
-- Returns {'ok'|'replay', hold amount, expires_ms, balance, held, credit_limit}.
-- Errors: INSUFFICIENT_FUNDS when the addition does not fit the wallet,
-- SPEND_LIMIT when it does not fit the credential's caps (the caller cuts the
-- call either way), HOLD_NOT_FOUND, HOLD_CLOSED.
-- Keeps: available never goes below 0; held == sum of active holds; a
-- credential's spent (captures + reservations) never exceeds its caps, nor a
-- budget's spent + held its limit.
local amount = int_arg(ARGV[2], 0, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'the extension must be an integer between 0 and ' .. fmt(MAX_AMOUNT))
end
local ttl = int_arg(ARGV[3], 1, 30 * 24 * 3600 * 1000)
local seen = int_arg(ARGV[4], 0, MAX_AMOUNT)
if ttl == nil or seen == nil then
  return fail('INVALID_REQUEST', 'ttl and step must be non-negative integers')
end
local checkpoint, checkpoint_tokens = nil, nil
if ARGV[5] and ARGV[5] ~= '' then
  checkpoint = int_arg(ARGV[5], 0, MAX_AMOUNT)
  checkpoint_tokens = int_arg(ARGV[6], 0, MAX_AMOUNT)
  if checkpoint == nil or checkpoint_tokens == nil then
    return fail('INVALID_REQUEST', 'the checkpoint must be non-negative integers')
  end
end
local rec = redis.call('HMGET', KEYS[3], 'status', 'amount', 'expires_ms', 'checkpoint')
if rec[1] == false then
  return fail('HOLD_NOT_FOUND', 'no hold ' .. ARGV[1] .. ' in this wallet')
end
if rec[1] ~= 'active' then
  return fail('HOLD_CLOSED', 'hold ' .. ARGV[1] .. ' was already ' .. rec[1])
end
local balance, held, credit_limit = wallet_state(KEYS[1])
local hold_amount = tonumber(rec[2])
if amount > 0 and hold_amount ~= seen then
  return {'replay', fmt(hold_amount), rec[3], fmt(balance), fmt(held), fmt(credit_limit)}
end
if amount > 0 then
  balance = grants_sweep_if_due(KEYS[1], KEYS[4], held, balance)  -- growth is never funded by an expired grant
end
local available = balance - held + credit_limit
if amount > available then
  return fail('INSUFFICIENT_FUNDS', 'extending the hold needs ' .. fmt(amount) .. ' micros and ' .. fmt(available) .. ' are available')
end
local L, request_id = nil, nil
if KEYS[5] and amount > 0 then
  request_id = redis.call('HGET', KEYS[3], 'request_id')
  if request_id then
    L = limits_load(KEYS[5], request_id)
    local cap, daily_cap = hold_caps(hold_load(KEYS[3], {'cap', 'daily_cap'}))
    local room = limits_room(L, request_id, cap, daily_cap)
    local r_amount = limits_reservation(L, request_id) or 0
    if room ~= nil and r_amount + amount > room then
      return fail('SPEND_LIMIT', 'extending the hold needs ' .. fmt(amount) .. ' micros and the key\'s spend cap leaves ' .. fmt(math.max(room - r_amount, 0)))
    end
  end
end
local budget_limit, budget_period, budget_reserved = nil, nil, 0
if amount > 0 then
  budget_limit, budget_period, budget_reserved = budget_of_hold(hold_load(KEYS[3], {'bud_limit', 'bud_period', 'bud_reserved'}))
end
local budget_spent, budget_held, period_now = 0, 0, nil
if budget_limit ~= nil then
  period_now = (ARGV[8] and ARGV[8] ~= '') and ARGV[8] or budget_period
  budget_spent, budget_held = budget_roll(period_now)
  if budget_spent + budget_held + amount > budget_limit then
    return fail('BUDGET_EXCEEDED', 'extending the hold needs ' .. fmt(amount) .. ' micros and the budget for ' ..
      period_now .. ' leaves ' .. fmt(math.max(budget_limit - budget_spent - budget_held, 0)))
  end
end
local expires = now_ms() + ttl
if budget_limit ~= nil then
  -- A hold from the period before counts only its growth in this one.
  local reserved = (budget_period == period_now) and budget_reserved + amount or amount
  redis.call('HSET', KEYS[1], 'bud_held', fmt(budget_held + amount))
  redis.call('HSET', KEYS[3], 'bud_period', period_now, 'bud_reserved', fmt(reserved))
end
if L ~= nil then
  limits_reserve_more(L, request_id, amount)
end
if amount > 0 then
  held = redis.call('HINCRBY', KEYS[1], 'held', amount)
  hold_amount = redis.call('HINCRBY', KEYS[2], ARGV[1], amount)
  append_ledger(KEYS[4], {'type', 'hold_extend', 'amount', '0', 'held_delta', fmt(amount),
    'balance', fmt(balance), 'held', fmt(held), 'hold_id', ARGV[1]})
end
redis.call('HSET', KEYS[3], 'amount', hold_amount, 'expires_ms', expires)
if checkpoint ~= nil and checkpoint >= (tonumber(rec[4]) or 0) then
  redis.call('HSET', KEYS[3], 'checkpoint', fmt(checkpoint), 'checkpoint_tokens', fmt(checkpoint_tokens),
    'checkpoint_meta', ARGV[7] or '')
end
return {'ok', fmt(hold_amount), fmt(expires), fmt(balance), fmt(held), fmt(credit_limit)}
