-- note: a ledger entry that moves no money but says something happened to the
-- wallet (it was out of funds, a key reached its spend cap, a payment failed),
-- so that the event it becomes is derived in ledger order with the rest.
-- KEYS[1] wallet hash   KEYS[2] ledger stream
-- ARGV[1] entry type   ARGV[2] reason (free text)   ARGV[3] metadata JSON
-- ARGV[4] flag field on the wallet hash ('' for none)   ARGV[5] flag value
-- With a flag: the note is written only when the field does not already hold
-- that value (so a storm of refusals writes one note), and the field is set.
-- `note:depleted` is cleared by any credit (see balance_op_finish), which
-- re-arms it.
-- Returns {'ok', ledger_id} or {'skip'}.
-- Keeps: balance == sum of ledger amounts (a note's amount is 0).
local balance, held = wallet_state(KEYS[1])
if balance == nil then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
if ARGV[4] ~= '' then
  if redis.call('HGET', KEYS[1], ARGV[4]) == ARGV[5] then
    return {'skip'}
  end
  redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
end
local id = append_ledger(KEYS[2], {'type', ARGV[1], 'amount', '0', 'balance', fmt(balance), 'held', fmt(held),
  'reason', ARGV[2], 'meta', ARGV[3]})
return {'ok', id}
