-- dispute: a card holder disputed a top-up's payment (a chargeback), or the dispute was closed.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- KEYS[4] card payments hash
-- ARGV[1] amount disputed (micros, > 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] PaymentIntent id   ARGV[5] metadata JSON   ARGV[6] idempotency key
-- ARGV[7] mode: 'opened' (Stripe took the money back: debited as far as the
-- wallet allows, down to -credit_limit, the rest recorded as the entry's
-- shortfall) or 'won' (the operator won it: what 'opened' debited comes back)
-- ARGV[8] the dispute's id (du_...)
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}.
-- Money leaves the purchased grant first (the card paid for it), then the rest in draw order.
-- Keeps: balance == sum of ledger amounts == sum of grants; balance never below -credit_limit;
-- a won dispute gives back exactly what its opening took, once, in whichever
-- order the two arrive.
local amount = int_arg(ARGV[1], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'amount_micros must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
if ARGV[7] ~= 'opened' and ARGV[7] ~= 'won' then
  return fail('INVALID_REQUEST', 'unknown dispute mode ' .. ARGV[7])
end
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
local debited_field = 'dispute:' .. ARGV[8]
local recorded = redis.call('HGET', KEYS[4], debited_field)
local delta, shortfall = 0, 0
if ARGV[7] == 'opened' then
  -- Stripe does not promise the order of deliveries: a dispute already won
  -- when its opening arrives takes nothing.
  if recorded ~= 'won' then
    local debit = math.min(amount, math.max(balance - held + credit_limit, 0))
    shortfall = amount - debit
    delta = -debit
  end
else
  delta = tonumber(recorded) or 0
end
local entry_type = (ARGV[7] == 'opened') and 'dispute' or 'dispute_won'
local fields = {'payment_intent', ARGV[4], 'reference', ARGV[8], 'idempotency_key', ARGV[6],
  'requested', fmt(amount), 'shortfall', fmt(shortfall), 'meta', ARGV[5]}
local result, err
if delta == 0 then
  local id = append_ledger(KEYS[2], {'type', entry_type, 'amount', '0', 'balance', fmt(balance), 'held', fmt(held),
    unpack(fields)})
  result = {'ok', id, fmt(balance), fmt(held), fmt(credit_limit)}
  remember_result(KEYS[3], ARGV[2], ARGV[3], result)
else
  result, err = balance_op_finish(entry_type, delta, balance, held, credit_limit, fields, nil, GRANT_PURCHASED)
  if err then
    return err
  end
end
if ARGV[7] == 'opened' then
  if recorded ~= 'won' then
    redis.call('HSET', KEYS[4], debited_field, fmt(0 - delta))
  end
else
  redis.call('HSET', KEYS[4], debited_field, 'won')
end
return result
