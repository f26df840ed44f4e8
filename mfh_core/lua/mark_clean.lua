-- After a batch is committed to SQL: an entry whose version is the persisted one becomes clean,
-- its cache TTL starts and it leaves the dirty set. An entry that moved on to a newer staged
-- version stays dirty (its own batch will clean it). Then announce the batch to PERSISTED waiters.
-- KEYS: dirty, item1 .. itemN
-- ARGV: ttl, channel, notification, vm1, vc1, .. vmN, vcN
local dirty = KEYS[1]
local ttl = tonumber(ARGV[1])
local cleaned = 0
for i = 2, #KEYS do
  local item = KEYS[i]
  local vm, vc = ARGV[2 + 2 * (i - 1)], ARGV[3 + 2 * (i - 1)]
  local cur = redis.call('HMGET', item, 'vm', 'vc')
  if cur[1] == false then
    redis.call('ZREM', dirty, item)
  elseif cur[1] == vm and cur[2] == vc then
    redis.call('HSET', item, 'dirty', '0')
    redis.call('HDEL', item, 'pst', 'pvm', 'pvc', 'pd', 'pk', 'po', 'pp', 'pu')
    redis.call('EXPIRE', item, ttl)
    redis.call('ZREM', dirty, item)
    cleaned = cleaned + 1
  end
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return cleaned
