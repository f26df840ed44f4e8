-- Stage a put or delete: check expected_version, refuse past the backlog bound, assign the next
-- hybrid-logical-clock version, write the entry dirty (no TTL) and index it in the dirty set.
-- Versions are handled as (ms, counter) pairs: Lua numbers are doubles and cannot hold 64 bits.
-- KEYS: item, hlc, dirty
-- ARGV: op, kind, payload, origin, has_expected, exp_ms, exp_ctr, max_backlog
local item, hlc, dirty = KEYS[1], KEYS[2], KEYS[3]
local cur = redis.call('HMGET', item, 'vm', 'vc', 'd', 'k')
local cm, cc = tonumber(cur[1]), tonumber(cur[2])

if ARGV[5] == '1' then
  local em, ec = tonumber(ARGV[6]), tonumber(ARGV[7])
  if em == 0 and ec == 0 then
    if cm and cur[3] ~= '1' then return {'conflict', cur[1], cur[2]} end
  elseif (not cm) or cm ~= em or cc ~= ec then
    return {'conflict', cur[1] or '0', cur[2] or '0'}
  end
end

local max_backlog = tonumber(ARGV[8])
if max_backlog > 0 and redis.call('ZCARD', dirty) >= max_backlog and not redis.call('ZSCORE', dirty, item) then
  return {'backlog'}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', hlc, 'm', 'c')
local m, c = now, 0
local function bump(om, oc)
  if om and (om > m or (om == m and oc + 1 > c)) then m, c = om, oc + 1 end
end
bump(tonumber(h[1]), tonumber(h[2]) or 0)
bump(cm, cc or 0)
if c > 65535 then m, c = m + 1, 0 end

local kind = ARGV[2]
if kind == '' then kind = cur[4] or 'memory_item' end
local deleted = '0'
if ARGV[1] == 'delete' then deleted = '1' end
local ms, cs = string.format('%.0f', m), string.format('%.0f', c)
redis.call('HSET', hlc, 'm', ms, 'c', cs)
redis.call('HSET', item, 'vm', ms, 'vc', cs, 'o', ARGV[4], 'd', deleted, 'k', kind, 'p', ARGV[3],
  'u', string.format('%.0f', now), 'dirty', '1')
redis.call('PERSIST', item)
redis.call('ZADD', dirty, now, item)
return {'ok', ms, cs, string.format('%.0f', now), kind}
