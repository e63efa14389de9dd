-- expire_grants: the reaper's pass over a wallet with a grant due to expire
-- (any other script of the wallet sweeps too, so a busy wallet never waits
-- for the reaper; this one is for wallets nobody is using).
-- KEYS[1] wallet hash   KEYS[2] ledger stream
-- Returns {'ok', balance, next_due} where next_due is when the wallet next
-- needs a sweep ('' for never, '0' while expired remainders wait for the holds
-- that reserved them), or {'missing'} for a wallet that does not exist.
-- Keeps: balance == sum of ledger amounts == sum of grants; money that live
-- holds reserved of an expired grant is left to them (see grants_sweep).
local balance, held = wallet_state(KEYS[1])
if balance == nil then
  return {'missing'}
end
balance = grants_sweep_if_due(KEYS[1], KEYS[2], held, balance)
return {'ok', fmt(balance), redis.call('HGET', KEYS[1], 'grants_due') or ''}
