-- auto_top_up_failed: an auto top-up attempt did not pay; count it, back off, and
-- turn the rule off after too many in a row.
-- KEYS[1] wallet hash   KEYS[2] billing hash   KEYS[3] ledger stream
-- ARGV[1] attempt   ARGV[2] 'declined' (counts as a failure: a decline, or the
-- bank asked for authentication) or 'unavailable' (Stripe did not answer; not
-- the card's fault, so not counted)   ARGV[3] error text   ARGV[4] retry after (ms)
-- ARGV[5] consecutive failures that turn the rule off
-- Returns {'ok'|'replay', failures, enabled ('1'|'0'), ledger_id of the last note ('' if none),
-- disabled_now ('1' when this failure turned the rule off)}.
-- Each attempt is counted once, whichever reports it (the attempt itself, or
-- the payment_intent.payment_failed webhook). A counted failure writes an
-- `auto_top_up_failed` ledger note (amount 0); the one that turns the rule off
-- writes an `auto_top_up_disabled` note after it.
-- Keeps: balance == sum of ledger amounts (the note moves nothing); a wallet
-- without `at_threshold` never claims another attempt.
local attempt = int_arg(ARGV[1], 1, MAX_AMOUNT)
local retry_after = int_arg(ARGV[4], 0, MAX_AMOUNT)
local max_failures = int_arg(ARGV[5], 1, 1000)
if attempt == nil or retry_after == nil or max_failures == nil or (ARGV[2] ~= 'declined' and ARGV[2] ~= 'unavailable') then
  return fail('INVALID_REQUEST', 'bad auto top-up failure report')
end
local balance, held = wallet_state(KEYS[1])
if balance == nil then
  return fail('WALLET_NOT_FOUND', 'no such wallet')
end
local rule = redis.call('HMGET', KEYS[2], 'at_last_finished', 'at_failures', 'at_enabled')
local failures = tonumber(rule[2]) or 0
if attempt <= (tonumber(rule[1]) or 0) then
  return {'replay', fmt(failures), rule[3] or '0', '', '0'}
end
redis.call('HSET', KEYS[2], 'at_last_finished', fmt(attempt), 'at_last_error', ARGV[3])
-- Only the latest claim's end moves the claim: a late report of an older
-- attempt must not shorten the lease of a newer one still in flight.
if attempt >= (tonumber(redis.call('HGET', KEYS[1], 'at_attempt')) or 0) then
  redis.call('HSET', KEYS[1], 'at_block_until', fmt(now_ms() + retry_after))
end
local enabled, note, disabled_now = rule[3] or '0', '', '0'
if ARGV[2] == 'declined' then
  failures = redis.call('HINCRBY', KEYS[2], 'at_failures', 1)
  note = append_ledger(KEYS[3], {'type', 'auto_top_up_failed', 'amount', '0', 'balance', fmt(balance),
    'held', fmt(held), 'reason', ARGV[3], 'attempt', fmt(attempt), 'failures', fmt(failures)})
  if failures >= max_failures and enabled == '1' then
    enabled, disabled_now = '0', '1'
    local reason = fmt(failures) .. ' consecutive auto top-up failures; last: ' .. ARGV[3]
    redis.call('HSET', KEYS[2], 'at_enabled', '0', 'at_disabled_reason', reason)
    redis.call('HDEL', KEYS[1], 'at_threshold')
    note = append_ledger(KEYS[3], {'type', 'auto_top_up_disabled', 'amount', '0', 'balance', fmt(balance),
      'held', fmt(held), 'reason', reason})
  end
end
return {'ok', fmt(failures), enabled, note, disabled_now}
