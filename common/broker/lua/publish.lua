-- publish.lua: publish messages of one channel, in order: for each, assign the next offset,
-- append it to the history, update the snapshot and notify the edges. The whole call is
-- atomic (so is each message in it). See docs/architecture.md.
--
-- All keys are the channel's (one hash slot, under its {channel} hash tag):
-- KEYS[1] meta hash     KEYS[2] stream     KEYS[3] snapshot hash
-- KEYS[4] idempotency hash of the current time bucket, KEYS[5] of the previous one
--   (bucket = floor(publisher's clock in s / idempotency TTL); field = upstream message
--   id, value "<epoch>:<offset>"). An id is looked up in both, and written to the current
--   one, which then expires 2 TTLs later: a replay within one TTL is always found, one
--   after 1 to 2 TTLs may be (see docs/architecture.md).
-- Per call:
-- ARGV[1] snapshot mode: merge | last | keyed | none (no snapshot kept)
-- ARGV[2] history max length        ARGV[3] history max age (ms)
-- ARGV[4] meta/snapshot TTL (s)     ARGV[5] idempotency TTL (s)
-- ARGV[6] live pub/sub channel      ARGV[7] epoch to use if the channel has none
-- ARGV[8] fencing token of the publishing leader ("" = unfenced)
-- ARGV[9] the leader's lease deadline, server clock in ms ("" = none)
-- ARGV[10] "1" = notify with SPUBLISH (Redis Cluster: sharded pub/sub; the live channel
--          shares this slot), else PUBLISH
-- Then 4 per message, from ARGV[11] (message i at ARGV[11 + 4 * (i - 1)] ...):
-- +0 data (JSON text)        +1 snapshot key ("" = unkeyed)
-- +2 upstream message id ("" = none: not idempotent)
-- +3 flags, one digit: 1 = delete the key from a keyed snapshot (the message says so to
--    clients), + 2 = publish only if the message changes the channel's snapshot (a state,
--    such as a depth level or a position: repeating the current state is not news); then,
--    in the same argument, when the message came from the upstream, wall clock in ms
--    (nothing = unknown): passed on to the edges, which measure delivery latency from it.
--    "3170000000123" = delete, if changed, received at 170000000123.
-- Returns {offset, epoch, status} per message, flattened: {o1, e1, s1, o2, e2, s2, ...}.
-- Status 0 = published, 1 = duplicate (the offset and epoch the message id was published
-- at), 2 = fenced (a higher token has published to the channel: nothing written; offset 0,
-- epoch = the channel's fence), 3 = expired (the server clock is past ARGV[9]: nothing
-- written; offset 0, epoch ""), 4 = unchanged (if-changed and the snapshot already holds
-- this state: nothing published; the channel's top offset and epoch, or 0 and "" for a
-- channel that has no epoch yet).
--
-- Each message is decided exactly as if it had been a call of its own, in order (a message
-- sees what the earlier ones of the call wrote: their offsets, ids and snapshot). What is
-- per call: one TIME (every entry of the call has the same `t`), one lookup of all the
-- call's ids (HMGET of each bucket) and one write of the published ones (HSET, EXPIRE),
-- the length and age trims of the history and the TTLs, one live message carrying every
-- message the call published (format: common/broker/live.py), and the snapshot's writes,
-- which are kept in a table and written once per key at the end (merge mode decodes a
-- stored value once and encodes the result once, however many messages of the call merge
-- into it).

local meta, stream, snap, idem, idem_prev = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode = ARGV[1]
local maxlen, maxage = tonumber(ARGV[2]), tonumber(ARGV[3])
local meta_ttl, idem_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local live = ARGV[6]
local token, deadline = ARGV[8], ARGV[9]
local notify = ARGV[10] == '1' and 'SPUBLISH' or 'PUBLISH'
local FIRST, PER = 11, 4
local count = (#ARGV - FIRST + 1) / PER

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

-- The JSON object `text` decodes to, or false (not JSON, or not an object: arrays are not).
local function as_object(text)
  local ok, v = pcall(cjson.decode, text)
  if ok and type(v) == 'table' and next(v) ~= 1 then
    return v
  end
  return false
end

local out = {}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_text = tostring(now)  -- formatted once, not by every XADD

-- Fencing, before anything else: a deposed leader writes nothing, not even a duplicate.
-- The meta's fence only grows with this token, so the answer is the same for every message.
local fence = nil  -- the meta's `fence` field as this call leaves it (nil = none)
if token ~= '' then
  token = tonumber(token)
  fence = tonumber(redis.call('HGET', meta, 'fence') or '0')
  if token < fence then
    for i = 1, count do
      out[#out + 1] = 0; out[#out + 1] = tostring(fence); out[#out + 1] = 2
    end
    return out
  end
else
  token = nil
end
if deadline ~= '' and now >= tonumber(deadline) then
  for i = 1, count do
    out[#out + 1] = 0; out[#out + 1] = ''; out[#out + 1] = 3
  end
  return out
end

local state = redis.call('HMGET', meta, 'epoch', 'top')
local epoch = state[1]
local top = tonumber(state[2] or '0')
local fence_dirty = false  -- fence to write at the end (top: when something was published)

-- A newer leader's token becomes the channel's fence (when it publishes, or is answered
-- as a duplicate or unchanged): from then on older tokens are rejected here.
local function raise_fence()
  if token and token > (fence or 0) then
    fence = token
    fence_dirty = true
  end
end

-- The snapshot as this call sees it: field -> {text = the stored JSON text, false if
-- absent, nil if `obj` holds a merged value not encoded yet; obj = the decoded object of
-- `text` (false: not an object; nil: not decoded yet); dirty = to write at the end}.
local cache = {}

local function entry(field)
  local e = cache[field]
  if not e then
    e = {text = redis.call('HGET', snap, field), dirty = false}
    cache[field] = e
  end
  return e
end

local function object_of(e)
  if e.obj == nil then
    e.obj = as_object(e.text)
  end
  return e.obj
end

-- Whether publishing `data` leaves the snapshot entry `field` as it is. `cur` returns the
-- message's data decoded as an object (or false), decoding it at most once.
local function unchanged(field, data, delete, cur)
  if mode == 'none' then
    return false  -- no state kept: every message is news
  end
  local e = entry(field)
  if mode == 'keyed' and delete then
    return e.text == false
  end
  if e.text == false then
    return false
  end
  if e.text == nil then
    -- A merge of this call not encoded yet: compare with what storing it gives (cjson's
    -- number precision), as a separate call would have read it back.
    e.text = cjson.encode(e.obj)
    e.obj = nil
  end
  if e.text == data then
    return true
  end
  if mode ~= 'merge' then
    return false
  end
  -- merge: unchanged iff every top-level field of data already has that value (merged as
  -- the snapshot update below does: objects only, not arrays; otherwise data replaces the
  -- value, and the text comparison above decided).
  local prev, new = object_of(e), cur()
  if not (prev and new) then
    return false
  end
  for k, v in pairs(new) do
    if not same(prev[k], v) then return false end
  end
  return true
end

local function update_snapshot(field, data, delete, cur)
  if mode == 'none' then
    return  -- no snapshot: a subscribe with snapshot gets an empty one
  end
  if mode == 'merge' then
    local e = entry(field)
    if e.text ~= false then
      local prev, new = object_of(e), cur()
      if prev and new then
        for k, v in pairs(new) do prev[k] = v end
        e.text = nil  -- encoded once, at the end
        e.dirty = true
        return
      end
    end
    cache[field] = {text = data, obj = cur(), dirty = true}
  elseif mode == 'keyed' and delete then
    cache[field] = {text = false, dirty = true}
  else
    cache[field] = {text = data, dirty = true}
  end
end

-- Idempotency: the call's ids, looked up in both buckets at once (a channel without an
-- epoch has no ids: creating the epoch deletes them). `known` maps an id to the offset it
-- was published at in this epoch; the call's own publications are added as they happen.
local known = {}
if epoch then
  local ids, n = {}, 0
  for base = FIRST + 2, #ARGV, PER do
    if ARGV[base] ~= '' then
      n = n + 1
      ids[n] = ARGV[base]
    end
  end
  if n > 0 then
    local prefix = epoch .. ':'
    local plen = #prefix
    -- the previous bucket first: the current one's value wins (it is the later write)
    for _, key in ipairs({idem_prev, idem}) do
      local found = redis.call('HMGET', key, unpack(ids))
      for j = 1, n do
        local v = found[j]
        if v and string.sub(v, 1, plen) == prefix then
          known[ids[j]] = tonumber(string.sub(v, plen + 1))
        end
      end
    end
  end
end

local published = 0
local first = nil  -- the first offset published by this call
local pieces, np = {}, 0  -- the live message, concatenated once at the end
local fresh, nf = {}, 0  -- HSET arguments: the ids published by this call, their values
local no = 0  -- entries in `out`

-- The current message's data decoded as an object (or false), decoded at most once (one
-- function for all messages: no closure per message).
local data, decoded = nil, nil
local function cur()
  if decoded == nil then
    decoded = as_object(data)
  end
  return decoded
end

for base = FIRST, #ARGV, PER do
  local key, id, flags = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  data, decoded = ARGV[base], nil
  local f = string.byte(flags, 1) - 48
  local deleted = (f % 2 == 1) and '1' or '0'
  local delete = deleted == '1'
  local offset, status = nil, nil

  if id ~= '' then
    local o = known[id]
    if o then
      raise_fence()  -- a newer leader replaying: fence it here too
      offset, status = o, 1
    end
  end

  if not status and f >= 2 then
    -- A channel without an epoch has an empty snapshot (creating the epoch empties it):
    -- only a keyed delete leaves it unchanged. Checked after fencing and idempotency: a
    -- deposed leader is refused, and a known id is a duplicate, whatever the state.
    if epoch then
      if unchanged(key, data, delete, cur) then
        raise_fence()  -- as for a duplicate: the state is current
        offset, status = top, 4
      end
    elseif mode == 'keyed' and delete then
      offset, status = 0, 4
    end
  end

  if not status then
    if not epoch then
      -- A new channel, or its state was lost (Redis restarted empty, or the meta expired):
      -- a new epoch, and nothing of an older epoch may survive next to it.
      epoch = ARGV[7]
      redis.call('DEL', meta, stream, snap, idem, idem_prev)
      redis.call('HSET', meta, 'epoch', epoch)
      top, fence, cache = 0, nil, {}
    end
    top = top + 1
    offset, status = top, 0
    raise_fence()
    published = published + 1
    first = first or offset
    local offset_text = tostring(offset)
    redis.call('XADD', stream, offset_text .. '-0', 'd', data, 'k', key, 't', now_text,
      'x', deleted)
    update_snapshot(key, data, delete, cur)
    if id ~= '' then
      known[id] = offset
      fresh[nf + 1] = id
      fresh[nf + 2] = epoch .. ':' .. offset_text
      nf = nf + 2
    end
    -- This message's record of the live message: "\30" (no JSON text holds one), then
    -- deleted, key, received ms, data, newline-separated (keys hold no control characters)
    pieces[np + 1] = '\30'
    pieces[np + 2] = deleted
    pieces[np + 3] = '\n'
    pieces[np + 4] = key
    pieces[np + 5] = '\n'
    pieces[np + 6] = string.sub(flags, 2)
    pieces[np + 7] = '\n'
    pieces[np + 8] = data
    np = np + 8
  end
  out[no + 1] = offset
  out[no + 2] = (status == 4 and not epoch) and '' or epoch
  out[no + 3] = status
  no = no + 3
end

if published > 0 and fence_dirty then
  redis.call('HSET', meta, 'top', top, 'fence', fence)
elseif published > 0 then
  redis.call('HSET', meta, 'top', top)
elseif fence_dirty then
  redis.call('HSET', meta, 'fence', fence)
end

if published > 0 then
  -- One live message for the call: "\30<epoch>\n<first offset>", then the records.
  redis.call(notify, live, '\30' .. epoch .. '\n' .. first .. table.concat(pieces))

  if nf > 0 then
    for j = 1, nf, 1000 do
      redis.call('HSET', idem, unpack(fresh, j, math.min(j + 999, nf)))
    end
    redis.call('EXPIRE', idem, 2 * idem_ttl)
  end

  -- The snapshot's writes, one per key.
  local sets, dels = {}, {}
  for field, e in pairs(cache) do
    if e.dirty then
      if e.text == false then
        dels[#dels + 1] = field
      else
        sets[#sets + 1] = field
        sets[#sets + 1] = e.text or cjson.encode(e.obj)
      end
      if #sets >= 1000 then
        redis.call('HSET', snap, unpack(sets))
        sets = {}
      end
      if #dels >= 1000 then
        redis.call('HDEL', snap, unpack(dels))
        dels = {}
      end
    end
  end
  if #sets > 0 then redis.call('HSET', snap, unpack(sets)) end
  if #dels > 0 then redis.call('HDEL', snap, unpack(dels)) end

  -- Trim by length (exact), then by age: look at the oldest entries, a bounded number
  -- (128) per message published.
  redis.call('XTRIM', stream, 'MAXLEN', maxlen)
  local cutoff = now - maxage
  for _ = 1, published do
    local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if not (head[1] and tonumber(head[1][2][6]) < cutoff) then
      break
    end
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 128)
    local keep = nil
    for _, item in ipairs(batch) do
      if tonumber(item[2][6]) >= cutoff then
        keep = item[1]
        break
      end
    end
    if keep then
      redis.call('XTRIM', stream, 'MINID', keep)
      break
    end
    local last = batch[#batch][1]
    redis.call('XTRIM', stream, 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
  end
  redis.call('PEXPIRE', stream, maxage)
  redis.call('EXPIRE', meta, meta_ttl)
  redis.call('EXPIRE', snap, meta_ttl)
end
return out
