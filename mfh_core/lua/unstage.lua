-- Take back the staged versions of one call whose batch could not be enqueued, so that an
-- UNAVAILABLE answer means nothing was staged. All or nothing, atomically with the version checks.
-- Per item:
--   * the entry still holds that version: restore what it held before (stage.lua's 'pst'):
--     'n' -> delete the entry (nothing unpersisted was there; reads fall back to SQL),
--     'd' -> put the remembered unpersisted version back (dirty, in the dirty set);
--     anything else (what was below is unknown) -> the whole call stays staged: 'kept';
--   * a newer version replaced it and remembered it as its previous one: forget that memory
--     ('pst' = 'x'), so the taken-back version can never come back;
--   * otherwise the version is gone already: nothing to do.
-- KEYS: dirty, item1..itemN
-- ARGV: vm1, vc1, .. vmN, vcN
-- Returns 'unstaged' (nothing of the call is staged any more) or 'kept' (all of it still is).
local dirty = KEYS[1]
local rows = {}
for i = 2, #KEYS do
  local vm, vc = ARGV[2 * (i - 1) - 1], ARGV[2 * (i - 1)]
  local c = redis.call('HMGET', KEYS[i], 'vm', 'vc', 'pst', 'pvm', 'pvc', 'pd', 'pk', 'po', 'pp', 'pu')
  local action = 'none'
  if c[1] == vm and c[2] == vc then
    if c[3] == 'n' then action = 'delete' elseif c[3] == 'd' then action = 'restore' else return 'kept' end
  elseif c[4] == vm and c[5] == vc then
    action = 'forget'
  end
  rows[i] = {action, c}
end
local stash = {'pvm', 'pvc', 'pd', 'pk', 'po', 'pp', 'pu'}
for i = 2, #KEYS do
  local item, action, c = KEYS[i], rows[i][1], rows[i][2]
  if action == 'delete' then
    redis.call('DEL', item)
    redis.call('ZREM', dirty, item)
  elseif action == 'restore' then
    redis.call('HSET', item, 'vm', c[4], 'vc', c[5], 'd', c[6], 'k', c[7], 'o', c[8], 'p', c[9], 'u', c[10],
      'dirty', '1', 'pst', 'x')
    redis.call('HDEL', item, unpack(stash))
    redis.call('PERSIST', item)
    redis.call('ZADD', dirty, tonumber(c[10]) or 0, item)
  elseif action == 'forget' then
    redis.call('HSET', item, 'pst', 'x')
    redis.call('HDEL', item, unpack(stash))
  end
end
return 'unstaged'
