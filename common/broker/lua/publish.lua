-- publish.lua: assign the next offset of a channel, append to its history, update its
-- snapshot and notify the edges, atomically. See docs/architecture.md.
--
-- KEYS[1] meta hash     KEYS[2] stream     KEYS[3] snapshot hash     KEYS[4] idempotency key
-- ARGV[1] data (JSON text)          ARGV[2] snapshot key ("" = unkeyed)
-- ARGV[3] upstream message id ("" = not idempotent)
-- ARGV[4] snapshot mode: merge | last | keyed | none (no snapshot kept)
-- ARGV[5] history max length        ARGV[6] history max age (ms)
-- ARGV[7] meta/snapshot TTL (s)     ARGV[8] idempotency TTL (s)
-- ARGV[9] live pub/sub channel      ARGV[10] epoch to use if the channel has none
-- ARGV[11] "1" = delete the key from a keyed snapshot (the message says so to clients), else "0"
-- ARGV[12] fencing token of the publishing leader ("" or absent = unfenced)
-- ARGV[13] the leader's lease deadline, server clock in ms ("" or absent = none)
-- ARGV[14] "1" = publish only if the message changes the channel's snapshot (a state, such
--          as a depth level or a position: repeating the current state is not news), else
--          "0" ("" or absent = "0")
-- ARGV[15] when the message came from the upstream, wall clock in ms ("" or absent =
--          unknown): passed on to the edges, which measure delivery latency from it
-- ARGV[16] "1" = notify with SPUBLISH (Redis Cluster: sharded pub/sub, the live channel
--          shares this slot), else PUBLISH ("" or absent = PUBLISH)
-- Returns {offset, epoch, status}: status 0 = published, 1 = duplicate (the offset and epoch
-- the message id was published at), 2 = fenced (a higher token has published to the
-- channel: nothing written; offset 0, epoch = the channel's fence), 3 = expired (the server
-- clock is past ARGV[13]: nothing written; offset 0, epoch ""), 4 = unchanged (ARGV[14] and
-- the snapshot already holds this state: nothing published; the channel's top offset and
-- epoch, or 0 and "" for a channel that has no epoch yet).

local meta, stream, snap, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local data, key, msgid, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxlen, maxage = tonumber(ARGV[5]), tonumber(ARGV[6])
local meta_ttl, idem_ttl = tonumber(ARGV[7]), tonumber(ARGV[8])

local token, deadline = ARGV[12] or '', ARGV[13] or ''
local if_changed = ARGV[14] == '1'
local delete = ARGV[11] == '1'

-- JSON equality of two decoded values (key order does not matter; cjson.null is a value).
local function same(a, b)
  if type(a) ~= 'table' or type(b) ~= 'table' then
    return a == b
  end
  for k, v in pairs(a) do
    if not same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

-- Whether publishing `data` leaves the snapshot entry `field` as it is.
local function unchanged(field)
  if mode == 'none' then
    return false  -- no state kept: every message is news
  end
  if mode == 'keyed' and delete then
    return redis.call('HEXISTS', snap, field) == 0
  end
  local old = redis.call('HGET', snap, field)
  if not old then
    return false
  end
  if old == data then
    return true
  end
  if mode ~= 'merge' then
    return false
  end
  -- merge: unchanged iff every top-level field of data already has that value (merged as
  -- the snapshot update below does: objects only, not arrays; otherwise data replaces the
  -- value, and the text comparison above decided).
  local ok_old, prev = pcall(cjson.decode, old)
  local ok_new, cur = pcall(cjson.decode, data)
  if not (ok_old and ok_new and type(prev) == 'table' and type(cur) == 'table'
      and next(cur) ~= 1 and next(prev) ~= 1) then
    return false
  end
  for k, v in pairs(cur) do
    if not same(prev[k], v) then return false end
  end
  return true
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Fencing, before anything else: a deposed leader writes nothing, not even a duplicate.
local fence = nil
if token ~= '' then
  token = tonumber(token)
  fence = tonumber(redis.call('HGET', meta, 'fence') or '0')
  if token < fence then
    return {0, tostring(fence), 2}
  end
end
if deadline ~= '' and now >= tonumber(deadline) then
  return {0, '', 3}
end

local epoch = redis.call('HGET', meta, 'epoch')

if msgid ~= '' and epoch then
  local prev = redis.call('GET', idem)
  if prev then
    local e, o = string.match(prev, '^([^:]+):(%d+)$')
    if e == epoch then
      if fence and token > fence then
        redis.call('HSET', meta, 'fence', token)  -- a newer leader replaying: fence it here too
      end
      return {tonumber(o), epoch, 1}
    end
  end
end

if if_changed then
  -- A channel without an epoch has an empty snapshot (creating the epoch empties it): only
  -- a keyed delete leaves it unchanged. Checked after fencing and idempotency: a deposed
  -- leader is refused, and a known id is a duplicate, whatever the state.
  local same_state
  if epoch then
    same_state = unchanged(key)
  else
    same_state = mode == 'keyed' and delete
  end
  if same_state then
    if not epoch then
      return {0, '', 4}
    end
    if fence and token > fence then
      redis.call('HSET', meta, 'fence', token)  -- as for a duplicate: the state is current
    end
    return {tonumber(redis.call('HGET', meta, 'top') or '0'), epoch, 4}
  end
end

if not epoch then
  -- A new channel, or its state was lost (Redis restarted empty, or the meta expired):
  -- a new epoch, and nothing of an older epoch may survive next to it.
  epoch = ARGV[10]
  redis.call('DEL', meta, stream, snap)
  redis.call('HSET', meta, 'epoch', epoch)
end
local offset = redis.call('HINCRBY', meta, 'top', 1)
if fence and token > fence then
  -- The first write of a newer leader: from now on older tokens are rejected here.
  redis.call('HSET', meta, 'fence', token)
end

redis.call('XADD', stream, 'MAXLEN', maxlen, offset .. '-0', 'd', data, 'k', key, 't', now,
  'x', ARGV[11])

-- Trim by age: look at the oldest entries, a bounded number per publish.
local cutoff = now - maxage
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if head[1] and tonumber(head[1][2][6]) < cutoff then
  local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 128)
  local keep = nil
  for _, entry in ipairs(batch) do
    if tonumber(entry[2][6]) >= cutoff then
      keep = entry[1]
      break
    end
  end
  if not keep then
    local last = batch[#batch][1]
    keep = (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0'
  end
  redis.call('XTRIM', stream, 'MINID', keep)
end
redis.call('PEXPIRE', stream, maxage)

local field = key
if mode == 'none' then
  -- no snapshot: a subscribe with snapshot (or one that cannot recover) gets an empty one
elseif mode == 'keyed' then
  if delete then
    redis.call('HDEL', snap, field)
  else
    redis.call('HSET', snap, field, data)
  end
elseif mode == 'merge' then
  local merged = data
  local old = redis.call('HGET', snap, field)
  if old then
    local ok_old, prev = pcall(cjson.decode, old)
    local ok_new, cur = pcall(cjson.decode, data)
    if ok_old and ok_new and type(prev) == 'table' and type(cur) == 'table'
        and next(cur) ~= 1 and next(prev) ~= 1 then
      for k, v in pairs(cur) do prev[k] = v end
      merged = cjson.encode(prev)
    end
  end
  redis.call('HSET', snap, field, merged)
else
  redis.call('HSET', snap, field, data)
end

redis.call('EXPIRE', meta, meta_ttl)
redis.call('EXPIRE', snap, meta_ttl)
if msgid ~= '' then
  redis.call('SET', idem, epoch .. ':' .. offset, 'EX', idem_ttl)
end

-- Live message: a newline-separated header (keys hold no control characters), then data.
-- ARGV[16] = '1': sharded pub/sub (Redis Cluster), the live channel is in this slot.
redis.call(ARGV[16] == '1' and 'SPUBLISH' or 'PUBLISH', ARGV[9], epoch .. '\n' .. offset .. '\n' .. ARGV[11] .. '\n' .. key
  .. '\n' .. (ARGV[15] or '') .. '\n' .. data)
return {offset, epoch, 0}
