-- acquire.lua: campaign for a feed's lease; the winner gets the next fencing token.
-- See docs/architecture.md, "Leader election and fencing".
--
-- KEYS[1] lease ("<token>:<owner>", PX TTL)     KEYS[2] fence counter (never expires)
-- ARGV[1] owner (this process's id)             ARGV[2] lease TTL (ms)
-- Returns {token, now_ms, ttl_ms, holder}:
--   acquired:     token > 0 (the new fencing token), ttl_ms = ARGV[2], holder = ""
--   not acquired: token = 0, ttl_ms = the lease's remaining PTTL (-1 = none), holder = its value
-- now_ms is the server's clock (TIME) when the script ran: the lease expires at now_ms + ttl_ms.

local lease, fence = KEYS[1], KEYS[2]
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local holder = redis.call('GET', lease)
if holder then
  -- Held. By an earlier term of this same process (it stepped down and could not release):
  -- take it over with a new token; by anyone else: wait for it to expire or be released.
  local suffix = ':' .. owner
  if string.sub(holder, -#suffix) ~= suffix then
    return {0, now, redis.call('PTTL', lease), holder}
  end
end

local token = redis.call('INCR', fence)
redis.call('SET', lease, token .. ':' .. owner, 'PX', ttl)
return {token, now, ttl, ''}
