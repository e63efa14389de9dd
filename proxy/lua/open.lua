-- open: create an end user's wallet (and its profile record) atomically.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] end-user profile hash
-- ARGV[1] credit_limit (micros, >= 0)   ARGV[2] profile as JSON   ARGV[3] end-user id
-- ARGV[4] '1' for a sandbox wallet (every ledger entry it gets says is_simulated), else ''
-- ARGV[5] (optional) the wallet's asset when not USD: its amounts are micros of it, and
--         every ledger entry names it (see append_ledger)
-- Returns {'ok', ledger_id, balance, held, credit_limit}.
-- Error WALLET_EXISTS when the id is taken. Keeps: a wallet starts at
-- balance 0, held 0, and its first ledger entry (amount 0) says so.
local credit_limit = int_arg(ARGV[1], 0, MAX_AMOUNT)
if credit_limit == nil then
  return fail('INVALID_AMOUNT', 'credit_limit must be an integer number of micros between 0 and ' .. fmt(MAX_AMOUNT))
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return fail('WALLET_EXISTS', 'an end user with this id already exists')
end
local now = now_ms()
-- grants_v: the wallet keeps its balance as grants from the start (see grants_load).
redis.call('HSET', KEYS[1], 'balance', 0, 'held', 0, 'credit_limit', credit_limit, 'created_ms', now, 'grants_v', '1')
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'simulated', '1')
end
if ARGV[5] and ARGV[5] ~= '' and ARGV[5] ~= 'USD' then
  redis.call('HSET', KEYS[1], 'asset', ARGV[5])
end
redis.call('HSET', KEYS[3], 'id', ARGV[3], 'profile', ARGV[2], 'created_ms', now)
local id = append_ledger(KEYS[2], {'type', 'open', 'amount', '0', 'balance', '0', 'held', '0',
  'credit_limit', fmt(credit_limit)})
return {'ok', id, '0', '0', fmt(credit_limit)}
