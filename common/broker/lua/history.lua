-- history.lua: a channel's position, the history after an offset, and its snapshot, read
-- atomically so that they agree with each other. See docs/architecture.md.
--
-- KEYS[1] meta hash     KEYS[2] stream     KEYS[3] snapshot hash
-- ARGV[1] since: return entries with offset > since (-1 = return no entries)
-- ARGV[2] limit: most entries to return; more missing than that = not recoverable
-- ARGV[3] snapshot: "1" = return it, "0" = don't, "r" = only if not recoverable
-- ARGV[4] epoch to create the channel with if it has none (so that an edge subscribing to
--         a channel before its first publish agrees with that publish on the epoch)
-- ARGV[5] meta TTL (s)
-- ARGV[6] the epoch the client's `since` belongs to ("" = the current one): recoverable
--         only if it is the channel's epoch
-- ARGV[7] inline: most entries to return in the reply ("" or absent = no limit). Past it
--         the caller reads them with XRANGE itself: turning a long XRANGE reply into Lua
--         tables and back costs Redis several times what the XRANGE does, and Redis runs
--         one thing at a time.
-- ARGV[8] until: the last offset wanted ("" or absent = top)
-- Returns {epoch, top, first, recoverable (0/1), entries, snapshot}
--   first: offset of the oldest retained entry (top + 1 when none is retained)
--   entries: flat {offset, key, deleted ("1"/"0"), data, ...}, the entries since + 1 ...
--     min(until, top), only when recoverable and they are at most `inline`; otherwise
--     empty (the caller tells the two apart by the numbers)
--   snapshot: flat {key, value, ...} (HGETALL), when asked for

local meta, stream, snap = KEYS[1], KEYS[2], KEYS[3]
local since, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local inline = tonumber(ARGV[7] or '') or limit
local until_ = tonumber(ARGV[8] or '')

local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', stream, snap)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  redis.call('EXPIRE', meta, tonumber(ARGV[5]))
end
local top = tonumber(redis.call('HGET', meta, 'top') or '0')

local first = top + 1
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if head[1] then
  first = tonumber(string.match(head[1][1], '^(%d+)'))
end

local recoverable = 0
local entries = {}
local same_epoch = ARGV[6] == '' or ARGV[6] == epoch
if same_epoch and since >= 0 and since <= top and since + 1 >= first
    and top - since <= limit then
  recoverable = 1
  local last = top
  if until_ and until_ < top then
    last = until_
  end
  if since < last and last - since <= inline then
    local rows = redis.call('XRANGE', stream, (since + 1) .. '-0', last .. '-0')
    for _, row in ipairs(rows) do
      entries[#entries + 1] = tonumber(string.match(row[1], '^(%d+)'))
      entries[#entries + 1] = row[2][4]
      entries[#entries + 1] = row[2][8] or '0'
      entries[#entries + 1] = row[2][2]
    end
  end
end

local snapshot = {}
if ARGV[3] == '1' or (ARGV[3] == 'r' and recoverable == 0) then
  snapshot = redis.call('HGETALL', snap)
end
return {epoch, top, first, recoverable, entries, snapshot}
