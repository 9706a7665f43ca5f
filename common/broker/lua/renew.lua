-- renew.lua: extend a feed's lease, only if this holder (token and owner) still has it.
-- See docs/architecture.md, "Leader election and fencing".
--
-- KEYS[1] lease
-- ARGV[1] "<token>:<owner>" as acquired          ARGV[2] lease TTL (ms)
-- Returns {renewed (1/0), now_ms, holder}: now_ms is the server's clock (TIME), so a renewed
-- lease expires at now_ms + ARGV[2]; holder is the lease's value when not renewed ("" = none).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return {1, now, ''}
end
return {0, now, holder or ''}
