-- trim: drop a wallet's oldest ledger entries from Redis once the ledger of
-- record holds them, keeping the sum of what was dropped so the wallet's
-- invariant stays checkable (balance == trimmed_sum + sum of the stream).
-- KEYS[1] ledger stream   KEYS[2] archive hash (cursor, trimmed_to, trimmed_sum)
-- KEYS[3] events hash (its `cursor`: the last entry events were derived from)
-- ARGV[1] the retention bound: only entries with an id below it may go
--         ("<ms>-0": now minus the retention window)
-- ARGV[2] at most this many entries per call (bounds the script's work)
-- Returns {'ok', entries trimmed, sum of their amounts}.
-- Keeps: no entry is trimmed before it is archived (id <= archive cursor) and
-- before its events are derived (id <= events cursor); trimmed_sum + the
-- stream's amounts == the wallet's balance.
local archived = redis.call('HGET', KEYS[2], 'cursor')
if not archived then
  return {'ok', '0', '0'}
end
local derived = redis.call('HGET', KEYS[3], 'cursor') or '0'
local limit = int_arg(ARGV[2], 1, 100000)
if limit == nil then
  return fail('INVALID_REQUEST', 'the count must be a positive integer')
end
local entries = redis.call('XRANGE', KEYS[1], '-', archived, 'COUNT', limit)
local total, n, last = 0, 0, nil
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
for _, entry in ipairs(entries) do
  local id = entry[1]
  if not before(id, ARGV[1]) or (derived ~= '0' and before(derived, id)) or derived == '0' then
    break
  end
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'amount' then
      total = total + tonumber(f[i + 1])
    end
  end
  n, last = n + 1, id
end
if n == 0 then
  return {'ok', '0', '0'}
end
-- XTRIM MINID drops the ids strictly below its argument: the one after `last`.
local ms, seq = string.match(last, '^(%d+)-(%d+)$')
redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. fmt(tonumber(seq) + 1))
redis.call('HINCRBY', KEYS[2], 'trimmed_sum', fmt(total))
redis.call('HSET', KEYS[2], 'trimmed_to', last)
return {'ok', fmt(n), fmt(total)}
