-- Drop a clean entry that holds exactly this (version, origin): the next read fills it from SQL.
-- The cross-host audit's repair uses it after rewriting a row changed behind the hub's back.
-- KEYS: item
-- ARGV: vm, vc, origin
local cur = redis.call('HMGET', KEYS[1], 'vm', 'vc', 'o', 'dirty')
if tonumber(cur[1]) == tonumber(ARGV[1]) and tonumber(cur[2]) == tonumber(ARGV[2]) and cur[3] == ARGV[3]
    and cur[4] == '0' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
