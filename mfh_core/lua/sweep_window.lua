-- Advance the sweep cursor: the dirty entries staged in (after, upto] are the next ones to sweep,
-- where upto is Redis's clock minus stale_ms (the dirty set's scores come from the same clock).
-- One caller gets each window, so worker processes sweeping side by side do not duplicate work.
-- KEYS: cursor; ARGV: stale_ms
-- Returns {after ('' when never swept), upto}; after == upto when there is nothing new to sweep.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local upto = string.format('%.0f', now - tonumber(ARGV[1]))
local after = redis.call('GET', KEYS[1])
if after and tonumber(after) >= tonumber(upto) then return {after, after} end
redis.call('SET', KEYS[1], upto)
return {after or '', upto}
