-- rebase.lua: start a new epoch for a channel whose offsets went back (Redis came back
-- with fewer writes than it had acknowledged: an AOF/RDB restore, an asynchronous replica
-- promoted). Offsets after the loss were reused with other messages; clients that hold the
-- old ones must resync, and a new epoch is how they learn it. See docs/architecture.md.
--
-- KEYS[1] meta hash     KEYS[2] stream
-- ARGV[1] the epoch the caller saw go back    ARGV[2] the new epoch
-- ARGV[3] fencing token of the caller ("" = unfenced)    ARGV[4] meta TTL (s)
-- Returns {epoch, status}: status 0 = rebased (epoch = the new one), 1 = not needed (the
-- channel is no longer in ARGV[1]: someone rebased or it was lost; epoch = its current one,
-- "" if none), 2 = fenced (a higher token has published to the channel: nothing written).
--
-- `top` and the snapshot stay: the snapshot is what Redis holds now, consistent with `top`,
-- and clients resync from it. The stream goes: its entries mix offsets of both histories.

local meta, stream = KEYS[1], KEYS[2]
local token = ARGV[3] or ''

if token ~= '' then
  local fence = tonumber(redis.call('HGET', meta, 'fence') or '0')
  if tonumber(token) < fence then
    return {'', 2}
  end
end

local epoch = redis.call('HGET', meta, 'epoch')
if epoch ~= ARGV[1] then
  return {epoch or '', 1}
end

redis.call('HSET', meta, 'epoch', ARGV[2])
redis.call('DEL', stream)
redis.call('EXPIRE', meta, tonumber(ARGV[4]))
return {ARGV[2], 0}
