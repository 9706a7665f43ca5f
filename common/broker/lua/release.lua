-- release.lua: give a feed's lease up, only if this holder (token and owner) still has it;
-- and raise the fence counter to at least a token seen in a channel's meta (a repair for a
-- lost counter; a no-op otherwise). See docs/architecture.md, "Leader election and fencing".
--
-- KEYS[1] lease     KEYS[2] fence counter
-- ARGV[1] "<token>:<owner>" as acquired          ARGV[2] fence floor ("0" = none)
-- Returns 1 if the lease was ours and is deleted, else 0.

local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  released = 1
end
local floor = tonumber(ARGV[2])
if floor > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], floor)
end
return released
