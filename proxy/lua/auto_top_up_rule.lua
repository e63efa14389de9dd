-- auto_top_up_rule: set a wallet's saved card and auto top-up rule.
-- KEYS[1] wallet hash   KEYS[2] billing hash
-- ARGV[1] mode: 'set' (the operator: the rule as given) or 'card_saved' (a
-- payment saved a card: it becomes the card, and the rule is set as given only
-- when none was set before -- the tier's default)
-- ARGV[2] enabled ('1'|'0')   ARGV[3] threshold (micros, >= 0)   ARGV[4] amount (micros, > 0)
-- ARGV[5] payment method id ('' keeps the saved one)   ARGV[6] card label ('' keeps it)
-- ARGV[7] Stripe customer id ('' keeps it)
-- Returns {'ok'}. Error NO_PAYMENT_METHOD when enabling a wallet with no saved card.
-- Enabling resets the failure count and lets the next low balance try at once
-- (once the attempt in flight, if any, has finished).
-- Keeps: `at_threshold` is on the wallet hash exactly when the rule is enabled
-- with a saved card (capture_hold claims attempts from it).
local threshold = int_arg(ARGV[3], 0, MAX_AMOUNT)
local amount = int_arg(ARGV[4], 1, MAX_AMOUNT)
if threshold == nil or amount == nil or (ARGV[2] ~= '1' and ARGV[2] ~= '0') then
  return fail('INVALID_AMOUNT', 'threshold and amount must be integers of micros (amount > 0)')
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
local has_card = ARGV[5] ~= '' or redis.call('HEXISTS', KEYS[2], 'payment_method') == 1
if ARGV[1] == 'set' and ARGV[2] == '1' and not has_card then
  return fail('NO_PAYMENT_METHOD', 'no saved card: a Checkout top-up with save_card must come first')
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], 'payment_method', ARGV[5])
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], 'card', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[2], 'customer', ARGV[7])
end
if ARGV[1] == 'card_saved' and redis.call('HEXISTS', KEYS[2], 'at_enabled') == 1 then
  return {'ok'}
end
redis.call('HSET', KEYS[2], 'at_enabled', ARGV[2], 'at_threshold', fmt(threshold), 'at_amount', fmt(amount))
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'at_failures', '0', 'at_disabled_reason', '')
  redis.call('HSET', KEYS[1], 'at_threshold', fmt(threshold))
  -- A backoff ends here, but an attempt still in flight keeps its lease: freeing
  -- it would let the next low settle charge the card a second time beside it.
  local claimed = tonumber(redis.call('HGET', KEYS[1], 'at_attempt')) or 0
  if claimed <= (tonumber(redis.call('HGET', KEYS[2], 'at_last_finished')) or 0) then
    redis.call('HDEL', KEYS[1], 'at_block_until')
  end
else
  redis.call('HDEL', KEYS[1], 'at_threshold')
end
return {'ok'}
