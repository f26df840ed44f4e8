-- Apply a version that was made elsewhere (another host's event, or a row read back from SQL),
-- only if it is newer than what the entry holds by (version, origin); move this host's clock past it.
-- mode 'remote': the entry is dirty until persisted here. mode 'fill': it came from SQL, so it is
-- clean and gets the cache TTL.
-- KEYS: item, hlc, dirty
-- ARGV: vm, vc, origin, deleted, kind, payload, updated_at, mode, ttl
local item, hlc, dirty = KEYS[1], KEYS[2], KEYS[3]
local vm, vc = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', hlc, 'm', 'c')
local hm, hc = tonumber(h[1]) or 0, tonumber(h[2]) or 0
if vm > hm or (vm == hm and vc > hc) then redis.call('HSET', hlc, 'm', ARGV[1], 'c', ARGV[2]) end

local cur = redis.call('HMGET', item, 'vm', 'vc', 'o')
local cm, cc = tonumber(cur[1]), tonumber(cur[2])
if cm then
  if cm > vm or (cm == vm and (cc > vc or (cc == vc and cur[3] >= ARGV[3]))) then return 0 end
end
local is_fill = ARGV[8] == 'fill'
local dirty_flag = '1'
if is_fill then dirty_flag = '0' end
redis.call('HSET', item, 'vm', ARGV[1], 'vc', ARGV[2], 'o', ARGV[3], 'd', ARGV[4], 'k', ARGV[5], 'p', ARGV[6],
  'u', ARGV[7], 'dirty', dirty_flag)
if is_fill then
  redis.call('EXPIRE', item, tonumber(ARGV[9]))
  redis.call('ZREM', dirty, item)
else
  redis.call('PERSIST', item)
  local t = redis.call('TIME')
  redis.call('ZADD', dirty, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), item)
end
return 1
