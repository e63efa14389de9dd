-- card_refund: money given back to the card that paid a top-up.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- KEYS[4] card payments hash
-- ARGV[1] amount (micros, > 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] PaymentIntent id   ARGV[5] metadata JSON   ARGV[6] idempotency key
-- ARGV[7] mode   ARGV[8] reference (the refund request's id, or Stripe's re_ id)
-- Modes:
--   'request'  the operator refunds unspent credit: debited now, before Stripe
--              is asked; at most what the payment credited less what was
--              refunded, and at most balance - held (credit is never refunded,
--              and live holds stay covered).
--   'restore'  Stripe refused that request: the debit is given back.
--   'external' a refund made outside metergate (Stripe's dashboard): the money
--              has left already, so it is debited as far as the wallet allows
--              (available, down to -credit_limit) and the rest is recorded as the
--              entry's shortfall -- the operator's loss, said in the ledger. What
--              it debited and counted is kept as refund:<re_ id> on the hash.
--   'external_failed' that refund failed after all (a closed card account):
--              what it debited comes back, and it no longer counts as refunded
--              (ARGV[1] is ignored beyond validation).
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}.
-- Money leaves the purchased grant first (the card paid for it), then the rest in draw order.
-- Keeps: balance == sum of ledger amounts == sum of grants; the refunds of one payment never
-- exceed what it credited; balance never below -credit_limit.
local amount = int_arg(ARGV[1], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'amount_micros must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
local mode = ARGV[7]
if mode ~= 'request' and mode ~= 'restore' and mode ~= 'external' and mode ~= 'external_failed' then
  return fail('INVALID_REQUEST', 'unknown card refund mode ' .. mode)
end
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
local credited = tonumber(redis.call('HGET', KEYS[4], ARGV[4]))
if credited == nil then
  return fail('PAYMENT_NOT_FOUND', 'no card payment ' .. ARGV[4] .. ' credited this wallet')
end
local refunded_field = ARGV[4] .. ':refunded'
local refunded = tonumber(redis.call('HGET', KEYS[4], refunded_field)) or 0
local delta, shortfall, counted = 0, 0, 0
local external_field = 'refund:' .. ARGV[8]
if mode == 'restore' then
  delta = math.min(amount, refunded)
  if delta == 0 then
    return fail('INVALID_REQUEST', 'nothing of ' .. ARGV[4] .. ' is refunded to restore')
  end
  counted = -delta
elseif mode == 'external_failed' then
  local kept = redis.call('HGET', KEYS[4], external_field)
  local debited, was_counted = nil, nil
  if kept then
    debited, was_counted = string.match(kept, '^(%d+)|(%d+)$')
  end
  if debited == nil then
    return fail('INVALID_REQUEST', 'no refund ' .. ARGV[8] .. ' of ' .. ARGV[4] .. ' was recorded to give back')
  end
  delta, counted = tonumber(debited), -tonumber(was_counted)
else
  local refundable = credited - refunded
  if mode == 'request' then
    if amount > refundable then
      return fail('REFUND_EXCEEDS_PAYMENT', ARGV[4] .. ' credited ' .. fmt(credited) .. ' micros and ' ..
        fmt(refunded) .. ' are already refunded')
    end
    if amount > balance - held then
      return fail('INSUFFICIENT_FUNDS', 'the wallet has ' .. fmt(math.max(balance - held, 0)) ..
        ' micros of its own not held by calls in flight')
    end
    delta, counted = -amount, amount
  else
    local debit = math.min(amount, refundable, math.max(balance - held + credit_limit, 0))
    counted = math.min(amount, refundable)
    shortfall = counted - debit
    delta = -debit
  end
end
local entry_type = (mode == 'restore' or mode == 'external_failed') and 'card_refund_reversed' or 'card_refund'
local fields = {'payment_intent', ARGV[4], 'reference', ARGV[8], 'idempotency_key', ARGV[6], 'meta', ARGV[5]}
if shortfall > 0 then
  fields[#fields + 1] = 'requested'
  fields[#fields + 1] = fmt(amount)
  fields[#fields + 1] = 'shortfall'
  fields[#fields + 1] = fmt(shortfall)
end
local result, err
if delta == 0 then
  -- An external refund of a wallet with nothing left: a note of the loss.
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
redis.call('HINCRBY', KEYS[4], refunded_field, counted)
if mode == 'external' then
  redis.call('HSET', KEYS[4], external_field, fmt(0 - delta) .. '|' .. fmt(counted))
elseif mode == 'external_failed' then
  redis.call('HDEL', KEYS[4], external_field)
end
return result
