-- card_payment: credit a wallet with a card payment (a Stripe PaymentIntent) exactly once.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record (keyed by the PaymentIntent id)
-- KEYS[4] card payments hash   KEYS[5] billing hash (the saved card and auto top-up rule)
-- ARGV[1] amount (micros, > 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] PaymentIntent id   ARGV[5] metadata JSON   ARGV[6] idempotency key
-- ARGV[7] the auto top-up attempt this payment was (0: a Checkout purchase)
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}.
-- Whichever report of the payment arrives first (the auto top-up's own answer,
-- checkout.session.completed, payment_intent.succeeded, a redelivery) credits;
-- the others replay. An auto top-up's success is recorded by every report of
-- it (idempotently): consecutive failures reset, and the wallet's claim freed.
-- Keeps: balance == sum of ledger amounts; a PaymentIntent credits at most once
-- (its idempotency record outlives Stripe's retries), and the card payments
-- hash remembers what it credited (the bound on refunds to the card).
local amount = int_arg(ARGV[1], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'amount_micros must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
local attempt = int_arg(ARGV[7], 0, MAX_AMOUNT)
if attempt == nil then
  return fail('INVALID_REQUEST', 'the auto top-up attempt must be a non-negative integer')
end
local early, balance, held, credit_limit = balance_op_start()
local result, err = early, nil
if not early then
  result, err = balance_op_finish('top_up', amount, balance, held, credit_limit,
    {'reference', ARGV[4], 'idempotency_key', ARGV[6], 'source', 'stripe', 'meta', ARGV[5]})
  if err then
    return err
  end
  redis.call('HSETNX', KEYS[4], ARGV[4], fmt(amount))
elseif early[1] ~= 'replay' then
  return early
end
if attempt > 0 and attempt > (tonumber(redis.call('HGET', KEYS[5], 'at_last_finished')) or 0) then
  redis.call('HSET', KEYS[5], 'at_last_finished', fmt(attempt), 'at_failures', '0', 'at_last_error', '')
  -- Only the latest claim's end frees the claim: a late report of an older
  -- attempt must not free a newer one still in flight.
  if attempt >= (tonumber(redis.call('HGET', KEYS[1], 'at_attempt')) or 0) then
    redis.call('HDEL', KEYS[1], 'at_block_until')
  end
end
return result
