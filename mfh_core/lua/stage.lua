-- Stage puts and deletes atomically: every check (expected_version, a delete's key must be live,
-- the backlog bound) runs before anything is written, so a batch is all or nothing and a delete
-- cannot tombstone a key another call deleted a moment before. Each change gets the next
-- hybrid-logical-clock version (versions grow within a batch), is written dirty with no TTL and
-- is indexed in the dirty set. Versions are (ms, counter) pairs: Lua numbers cannot hold 64 bits.
-- What the entry held before is remembered for unstage.lua (a write whose batch could not be
-- enqueued is taken back): 'pst' = 'n' (nothing unpersisted before: unstage deletes the entry and
-- reads fall back to SQL), 'd' (an unpersisted version, copied into the p* fields, is restored).
-- The version's wall time is Redis TIME plus ARGV[3] (storage.clock_skew_ms, 0 in production): the
-- one place a test moves a host's clock; the dirty set's scores and 'u' keep Redis's own clock.
-- One call can carry several callers' groups of changes (the hot store coalesces concurrent calls):
-- each group is all or nothing on its own, and the groups run one after another exactly as separate
-- calls would (a group sees what the groups before it wrote), so one caller's conflict fails no other.
-- KEYS: hlc, dirty, then the items of every group in order
-- ARGV: origin, max_backlog, clock_skew_ms, group count G, then G group sizes, then per item:
--       op, kind ('' keeps the key's own), payload, has_expected, exp_ms, exp_ctr
-- Returns one result per group: {'ok', now, ms1, ctr1, kind1, ...} | {'absent', i} | {'conflict', i, ms, ctr}
--   | {'backlog'} (i counts from 1 within the group)
local hlc, dirty = KEYS[1], KEYS[2]
local max_backlog = tonumber(ARGV[2])
local groups = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wall = now + (tonumber(ARGV[3]) or 0)
local snow = string.format('%.0f', now)
local h = redis.call('HMGET', hlc, 'm', 'c')
local hm, hc = tonumber(h[1]), tonumber(h[2]) or 0
local moved = false

-- Check one group (items first..first+n-1): nil when it may be written, else its failure.
local function check(first, n, argbase)
  local cur, new_dirty = {}, 0
  for i = 1, n do
    local item, base = KEYS[first + i - 1], argbase + (i - 1) * 6
    local c = redis.call('HMGET', item, 'vm', 'vc', 'd', 'k', 'dirty')
    cur[i] = c
    local cm, cc = tonumber(c[1]), tonumber(c[2])
    if ARGV[base + 1] == 'delete' and ((not cm) or c[3] == '1') then return nil, {'absent', tostring(i)} end
    if ARGV[base + 4] == '1' then
      local em, ec = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
      if em == 0 and ec == 0 then
        if cm and c[3] ~= '1' then return nil, {'conflict', tostring(i), c[1], c[2]} end
      elseif (not cm) or cm ~= em or cc ~= ec then
        return nil, {'conflict', tostring(i), c[1] or '0', c[2] or '0'}
      end
    end
    if not redis.call('ZSCORE', dirty, item) then new_dirty = new_dirty + 1 end
  end
  if max_backlog > 0 and new_dirty > 0 and redis.call('ZCARD', dirty) + new_dirty > max_backlog then
    return nil, {'backlog'}
  end
  return cur, nil
end

local function write(first, n, argbase, cur)
  local out = {'ok', snow}
  for i = 1, n do
    local item, base = KEYS[first + i - 1], argbase + (i - 1) * 6
    local m, c = wall, 0
    local function bump(om, oc)
      if om and (om > m or (om == m and oc + 1 > c)) then m, c = om, oc + 1 end
    end
    bump(hm, hc)
    bump(tonumber(cur[i][1]), tonumber(cur[i][2]) or 0)
    if c > 65535 then m, c = m + 1, 0 end
    hm, hc = m, c
    local kind = ARGV[base + 2]
    if kind == '' then kind = cur[i][4] or 'memory_item' end
    local deleted = '0'
    if ARGV[base + 1] == 'delete' then deleted = '1' end
    local ms, cs = string.format('%.0f', m), string.format('%.0f', c)
    if cur[i][5] == '1' then
      local prev = redis.call('HMGET', item, 'o', 'p', 'u')
      redis.call('HSET', item, 'pst', 'd', 'pvm', cur[i][1], 'pvc', cur[i][2], 'pd', cur[i][3], 'pk', cur[i][4],
        'po', prev[1] or '', 'pp', prev[2] or 'null', 'pu', prev[3] or '0')
    else
      redis.call('HDEL', item, 'pvm', 'pvc', 'pd', 'pk', 'po', 'pp', 'pu')
      redis.call('HSET', item, 'pst', 'n')
    end
    redis.call('HSET', item, 'vm', ms, 'vc', cs, 'o', ARGV[1], 'd', deleted, 'k', kind, 'p', ARGV[base + 3],
      'u', snow, 'dirty', '1')
    redis.call('PERSIST', item)
    redis.call('ZADD', dirty, now, item)
    out[#out + 1] = ms
    out[#out + 1] = cs
    out[#out + 1] = kind
  end
  moved = true
  return out
end

local results = {}
local first, argbase = 3, 4 + groups
for g = 1, groups do
  local n = tonumber(ARGV[4 + g])
  local cur, failed = check(first, n, argbase)
  if failed then results[g] = failed else results[g] = write(first, n, argbase, cur) end
  first, argbase = first + n, argbase + n * 6
end
if moved then
  redis.call('HSET', hlc, 'm', string.format('%.0f', hm), 'c', string.format('%.0f', hc))
end
return results
