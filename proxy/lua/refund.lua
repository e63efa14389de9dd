-- refund: give back (part of) a charge to the wallet that paid it.
-- KEYS[1] wallet hash   KEYS[2] ledger stream   KEYS[3] idempotency record
-- KEYS[4] refunded-per-charge hash
-- ARGV[1] amount (micros, > 0)   ARGV[2] fingerprint   ARGV[3] idempotency TTL (s)
-- ARGV[4] charge ledger id   ARGV[5] reason   ARGV[6] metadata JSON   ARGV[7] idempotency key
-- Optional, for a charge already trimmed from the stream (see trim.lua): KEYS[5]
-- the wallet's archive hash and ARGV[8] what the charge captured, as the ledger
-- of record holds it, and ARGV[9] the grants it drew (its `grants` field); taken only if the
-- charge id is at or before `trimmed_to`
-- (so it was archived, and cannot be in the stream any more).
-- Returns {'ok'|'replay', ledger_id, balance, held, credit_limit}.
-- The refund goes back to the grants the charge drew from (its `grants`
-- field), last drawn first; what would return to a grant that has expired
-- lapses at once, with a grant_expired entry after the refund (see grants_refund).
-- A charge made before grants is refunded as purchased money. The refunded hash also counts per charge and grant
-- ('<charge id>|<grant id>').
-- Keeps: the refunds of one charge never add up to more than it captured, nor
-- return more to a grant than the charge drew from it;
-- balance == sum of ledger amounts == sum of grants.
local amount = int_arg(ARGV[1], 1, MAX_AMOUNT)
if amount == nil then
  return fail('INVALID_AMOUNT', 'amount_micros must be an integer between 1 and ' .. fmt(MAX_AMOUNT))
end
if not string.match(ARGV[4], '^%d+%-%d+$') then
  return fail('INVALID_REQUEST', 'charge_id must be the ledger id of a charge')
end
local early, balance, held, credit_limit = balance_op_start()
if early then
  return early
end
local entries = redis.call('XRANGE', KEYS[2], ARGV[4], ARGV[4])
local charged, draws = nil, nil
if #entries == 1 then
  local f = entries[1][2]
  local fields = {}
  for i = 1, #f, 2 do
    fields[f[i]] = f[i + 1]
  end
  if fields['type'] == 'charge' then
    charged = -tonumber(fields['amount'])
    draws = fields['grants']
  end
end
if charged == nil and #entries == 0 and KEYS[5] and ARGV[8] and ARGV[8] ~= '' then
  local trimmed_to = redis.call('HGET', KEYS[5], 'trimmed_to')
  if trimmed_to then
    local cm, cs = string.match(ARGV[4], '^(%d+)-(%d+)$')
    local tm, ts = string.match(trimmed_to, '^(%d+)-(%d+)$')
    cm, cs, tm, ts = tonumber(cm), tonumber(cs), tonumber(tm), tonumber(ts)
    if cm < tm or (cm == tm and cs <= ts) then
      charged = int_arg(ARGV[8], 0, MAX_AMOUNT)
      draws = ARGV[9]
    end
  end
end
if charged == nil then
  return fail('CHARGE_NOT_FOUND', 'no charge with id ' .. ARGV[4] .. ' in this wallet')
end
local already = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
if already + amount > charged then
  return fail('REFUND_EXCEEDS_CHARGE', 'charge ' .. ARGV[4] .. ' captured ' .. fmt(charged) ..
    ' micros and ' .. fmt(already) .. ' are already refunded')
end
local per_grant = {}
local function to_grants(G, a)
  local moved, lapsed, per = grants_refund(G, a, draws, function(grant_id)
    return tonumber(redis.call('HGET', KEYS[4], ARGV[4] .. '|' .. grant_id) or '0')
  end)
  per_grant = per
  return moved, lapsed
end
local result, err = balance_op_finish('refund', amount, balance, held, credit_limit,
  {'charge_id', ARGV[4], 'reason', ARGV[5], 'idempotency_key', ARGV[7], 'meta', ARGV[6]}, to_grants)
if result then
  redis.call('HINCRBY', KEYS[4], ARGV[4], amount)
  for grant_id, returned in pairs(per_grant) do
    redis.call('HINCRBY', KEYS[4], ARGV[4] .. '|' .. grant_id, returned)
  end
end
return result or err
