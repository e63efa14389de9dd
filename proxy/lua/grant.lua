-- grant: give a wallet credit of a kind, with a priority and an optional
-- expiry (promotional credit, a plan's monthly allowance, a goodwill gesture).
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- ARGV[1] amount (micros, > 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] kind (not 'purchased' nor 'debt': top-ups make purchased money)
-- ARGV[5] priority (0..100, 0 spent first)   ARGV[6] expires_ms (0: never; else in the future)
-- ARGV[7] metadata JSON   ARGV[8] idempotency key (recorded in the ledger entry)
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit, grant_id}.
-- The new grant is its own ('gr_<n>'), never merged with another, and repays no
-- debt (only purchased money does). Its expiry is swept by any later script of
-- the wallet, and by the reaper's pass (expire_grants.lua).
-- Keeps: balance == sum of ledger amounts == sum of grants (the entry carries +amount).
local amount = int_arg(ARGV[1], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'amount_micros must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
local kind = ARGV[4]
if not string.match(kind, '^[a-z][a-z0-9_]*$') or #kind > 32 or kind == 'purchased' or kind == 'debt' then
  return fail('INVALID_REQUEST', 'kind must be 1-32 of a-z 0-9 _, starting with a letter, and not purchased or debt')
end
local priority = int_arg(ARGV[5], 0, 100)
local expires = int_arg(ARGV[6], 0, 253402300799000)
if priority == nil or expires == nil then
  return fail('INVALID_REQUEST', 'priority must be 0-100 and expires_ms a time in milliseconds')
end
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
if expires ~= 0 and expires <= now_ms() then
  return fail('INVALID_REQUEST', 'expires_at must be in the future')
end
if balance + amount > MAX_BALANCE then
  return fail('BALANCE_LIMIT', 'the balance would exceed ' .. fmt(MAX_BALANCE) .. ' micros')
end
local seq = redis.call('HINCRBY', KEYS[1], 'grant_seq', 1)
local grant_id = 'gr_' .. fmt(seq)
local function new_grant(G, a)
  local g = {id = grant_id, remaining = a, priority = priority, expires = expires, seq = seq, kind = kind, state = 'live'}
  G.by_id[grant_id] = g
  G.list[#G.list + 1] = g
  G.dirty[grant_id] = g
  return grant_id .. ':' .. fmt(a), 0
end
local expires_field = expires > 0 and fmt(expires) or ''
local result, err = balance_op_finish('grant', amount, balance, held, credit_limit,
  {'grant_id', grant_id, 'kind', kind, 'priority', fmt(priority), 'expires_ms', expires_field,
   'idempotency_key', ARGV[8], 'meta', ARGV[7]}, new_grant)
if err then
  return err
end
if expires > 0 then
  local due = tonumber(redis.call('HGET', KEYS[1], 'grants_due'))
  if due == nil or expires < due then
    redis.call('HSET', KEYS[1], 'grants_due', fmt(expires))
  end
end
result[#result + 1] = grant_id
remember_result(KEYS[3], ARGV[2], ARGV[3], result)
return result
