"""The Lua scripts of the Redis backend: every check-and-write is one script, so it is atomic
(Redis runs a script to its end before any other command) and lands in the AOF as one unit.

Layout under the key prefix ``p`` (every value in a record hash is JSON text):

* ``s:<stream>``  hash: ``next`` (next offset), ``closed`` (0/1), ``ct``, ``owner`` (JSON),
  ``created``, ``bytes``, ``lb``/``lf`` (the last batch's token and first offset), ``packed``;
* ``m:<stream>``  list: the stream's messages; offset ``n`` is index ``n``. Once the stream is
  closed and packed, ``mb:<stream>`` (hash: first offset -> zlib block of length-prefixed
  messages) and ``mbi:<stream>`` (zset of first offsets) hold them instead;
* ``g:<generation>``  hash: the record's fields, and ``text_chars``;
  ``t:<generation>``  string: the snapshot's text;
* ``gens`` zset (creation time), ``active`` set (queued or running), ``sa:<session>`` and
  ``oa:<owner>`` sets (a session's, an owner's active ones), ``sg:<session>`` zset (a
  session's, by creation time; members ``<seq>:<id>``, so ties keep creation order);
* ``S:<session>`` hash: the record's fields and ``msg_bytes``; ``SM:<session>`` list: its
  messages (JSON); ``os:<owner>`` zset (an owner's sessions by activity), ``oo:<owner>``
  set (their open ones), ``idle`` zset (open, not kept open, by activity), ``closed`` zset
  (closed, by closing time); ``keys`` hash (kept responses by owner and key) and
  ``SK:<session>`` set (a session's keys);
* ``ob`` hash: stream bytes by owner; ``workers`` hash: worker records (JSON);
* ``changes``: the pub/sub channel each write publishes the streams it changed on, after
  the write (``<node> <stream> <stream> …``).

Scripts name keys from ``ARGV[1]`` (the prefix) rather than ``KEYS``: keepstream runs on one
Redis primary, not on Redis Cluster. The client retries a call whose connection dropped, so
a script may run twice: creations carry a call token (the second run of the same call
succeeds, a real duplicate is refused), appends a batch token, and the rest are idempotent.
"""

from __future__ import annotations

# Shared by every script: the prefix, JSON helpers and the index upkeep.
PRELUDE = r"""
local p = ARGV[1]
local READ_BLOCKS = 4  -- packed blocks one read returns at most (each <= 64 KiB of messages)
local function str(v)
  if v == false or v == nil or v == 'null' then return nil end
  return cjson.decode(v)
end
local function active(status)
  return status == '"queued"' or status == '"running"'
end
local function gen_index(gid)
  local f = redis.call('HMGET', p..'g:'..gid, 'status', 'session_id', 'owner')
  local on = active(f[1])
  local op = on and 'SADD' or 'SREM'
  redis.call(op, p..'active', gid)
  local session = str(f[2])
  if session then redis.call(op, p..'sa:'..session, gid) end
  if f[3] and f[3] ~= 'null' then redis.call(op, p..'oa:'..f[3], gid) end
end
-- name/value pairs from ARGV[i..]: 'text' goes to the text key, the rest to the hash
local function set_gen_fields(gid, i, n)
  local gkey = p..'g:'..gid
  local status = false
  for j = i, i + 2 * n - 1, 2 do
    local name, value = ARGV[j], ARGV[j + 1]
    if name == 'text' then redis.call('SET', p..'t:'..gid, value)
    else
      redis.call('HSET', gkey, name, value)
      if name == 'status' then status = true end
    end
  end
  if status then gen_index(gid) end
end
local function push(key, i, n)
  for j = i, i + n - 1, 4000 do
    redis.call('RPUSH', key, unpack(ARGV, j, math.min(j + 3999, i + n - 1)))
  end
end
local function sizes(i, n)
  local size = 0
  for j = i, i + n - 1 do size = size + #ARGV[j] end
  return size
end
local function add_bytes(skey, owner, size)
  if size == 0 then return end
  redis.call('HINCRBY', skey, 'bytes', size)
  if owner and owner ~= 'null' then redis.call('HINCRBY', p..'ob', owner, size) end
end
local function publish(node, changed)
  if #changed > 0 then
    redis.call('PUBLISH', p..'changes', node..' '..table.concat(changed, ' '))
  end
end
local function delete_stream(sid)
  local skey = p..'s:'..sid
  local f = redis.call('HMGET', skey, 'owner', 'bytes')
  local size = tonumber(f[2] or '0')
  if size > 0 and f[1] and f[1] ~= 'null' then
    redis.call('HINCRBY', p..'ob', f[1], 0 - size)
  end
  return redis.call('DEL', skey, p..'m:'..sid, p..'mb:'..sid, p..'mbi:'..sid)
end
-- the session's index entries from its hash
local function session_index(id)
  local f = redis.call('HMGET', p..'S:'..id,
    'owner', 'status', 'keep_open', 'last_activity_at', 'closed_at')
  local owner = f[1] or 'null'
  redis.call('ZADD', p..'os:'..owner, f[4], id)
  if f[2] == '"closed"' then
    redis.call('SREM', p..'oo:'..owner, id)
    redis.call('ZREM', p..'idle', id)
    local at = f[5]
    if at == false or at == 'null' then at = '0' end
    redis.call('ZADD', p..'closed', at, id)
  else
    redis.call('SADD', p..'oo:'..owner, id)
    redis.call('ZREM', p..'closed', id)
    if f[3] == 'true' then redis.call('ZREM', p..'idle', id)
    else redis.call('ZADD', p..'idle', f[4], id) end
  end
end
local function open_below(owner, maximum, excluding)
  local count = redis.call('SCARD', p..'oo:'..owner)
  if excluding and redis.call('SISMEMBER', p..'oo:'..owner, excluding) == 1 then
    count = count - 1
  end
  if count >= maximum then return 'E:open_sessions:'..count end
  return nil
end
local function content_bytes(entry)
  local content = cjson.decode(entry).content
  if type(content) == 'string' then return #content end
  return 0
end
-- a SessionWrite from ARGV[i..]; returns an error string, or nil once it is written
local function session_write(i, gid)
  local id, only_if_idle, replace, now, max_messages = ARGV[i], ARGV[i+1], ARGV[i+2],
    ARGV[i+3], tonumber(ARGV[i+4])
  local n = tonumber(ARGV[i+5])
  local skey = p..'S:'..id
  local mkey = p..'SM:'..id
  if redis.call('EXISTS', skey) == 0 then return 'E:session_not_found:'..id end
  if only_if_idle == '1' then
    local busy = redis.call('SMEMBERS', p..'sa:'..id)
    local newest, newest_at = nil, nil
    for _, other in ipairs(busy) do
      if other ~= gid then
        local at = tonumber(redis.call('HGET', p..'g:'..other, 'created_at'))
        if newest == nil or at > newest_at then newest, newest_at = other, at end
      end
    end
    if newest then return 'E:busy:'..newest end
  end
  local k = i + 6 + n
  local kept_field = ARGV[k+1]..'\n'..ARGV[k+2]
  if ARGV[k] == '1' and redis.call('HEXISTS', p..'keys', kept_field) == 1 then
    return 'E:idempotency_key:'..ARGV[k+2]
  end
  local f = redis.call('HMGET', skey, 'next_seq', 'message_count', 'trimmed_messages', 'msg_bytes')
  local next_seq, count, trimmed_total = tonumber(f[1]), tonumber(f[2]), tonumber(f[3])
  local msg_bytes = tonumber(f[4] or '0')
  local dropped = false
  if replace == '1' then
    local last = redis.call('LINDEX', mkey, -1)
    if last and cjson.decode(last).role == 'assistant' then
      redis.call('RPOP', mkey)
      msg_bytes = msg_bytes - content_bytes(last)
      count = count - 1
      dropped = true
    end
  end
  for j = i + 6, i + 5 + n do
    local entry = '{"seq":'..next_seq..','..ARGV[j]..'}'
    redis.call('RPUSH', mkey, entry)
    msg_bytes = msg_bytes + content_bytes(entry)
    next_seq = next_seq + 1
    count = count + 1
  end
  local trimmed = 0
  if count > max_messages then
    trimmed = count - max_messages
    for _, old in ipairs(redis.call('LPOP', mkey, trimmed)) do
      msg_bytes = msg_bytes - content_bytes(old)
    end
    count = max_messages
  end
  if n > 0 or dropped then
    redis.call('HSET', skey, 'next_seq', next_seq, 'message_count', count,
      'trimmed_messages', trimmed_total + trimmed, 'msg_bytes', msg_bytes,
      'updated_at', now, 'last_activity_at', now)
    session_index(id)
  end
  if ARGV[k] == '1' then
    redis.call('HSET', p..'keys', kept_field, ARGV[k+3])
    redis.call('SADD', p..'SK:'..id, kept_field)
  end
  return nil
end
"""

# ARGV: p, node, n; per batch: token, stream, generation, fence, close, has_text, text,
# text_chars, n_fields, fields…, n_payloads, payloads…  Returns per batch its first offset,
# or 'E:<why>'. A batch whose token the stream already holds was applied (a retry after a
# lost reply): its first offset is returned again and nothing is written twice.
APPEND = r"""
local node = ARGV[2]
local i = 4
local results = {}
local changed = {}
for b = 1, tonumber(ARGV[3]) do
  local token, sid, gid, fence = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local close, has_text, text, chars = ARGV[i+4], ARGV[i+5], ARGV[i+6], ARGV[i+7]
  local nf = tonumber(ARGV[i+8])
  local fields_at = i + 9
  local np = tonumber(ARGV[fields_at + 2 * nf])
  local payloads_at = fields_at + 2 * nf + 1
  i = payloads_at + np
  local skey = p..'s:'..sid
  local meta = redis.call('HMGET', skey, 'closed', 'next', 'owner', 'lb', 'lf')
  if meta[2] == false then results[b] = 'E:not_found'
  elseif meta[4] == token then results[b] = tonumber(meta[5])
  elseif meta[1] == '1' then results[b] = 'E:closed:'..meta[2]
  elseif gid ~= '' and fence ~= '' and redis.call('HGET', p..'g:'..gid, 'worker_id') ~= fence
  then results[b] = 'E:fenced'
  else
    local first = tonumber(meta[2])
    if np > 0 then
      push(p..'m:'..sid, payloads_at, np)
      add_bytes(skey, meta[3], sizes(payloads_at, np))
    end
    redis.call('HSET', skey, 'next', first + np, 'lb', token, 'lf', first)
    if close == '1' then redis.call('HSET', skey, 'closed', 1) end
    if gid ~= '' then
      local gkey = p..'g:'..gid
      if has_text == '1' then
        if text ~= '' then
          redis.call('APPEND', p..'t:'..gid, text)
          redis.call('HINCRBY', gkey, 'text_chars', chars)
        end
        redis.call('HSET', gkey, 'next_offset', first + np)
      end
      set_gen_fields(gid, fields_at, nf)
    end
    results[b] = first
    changed[#changed + 1] = sid
  end
end
publish(node, changed)
return results
"""

# ARGV: p, stream, content type, now, owner (JSON), call token
CREATE_STREAM = r"""
local skey = p..'s:'..ARGV[2]
if redis.call('EXISTS', skey) == 1 then
  if redis.call('HGET', skey, 'call') == ARGV[6] then return 'OK' end  -- this call, retried
  return 'E:exists'
end
redis.call('HSET', skey, 'next', 0, 'closed', 0, 'ct', ARGV[3], 'created', ARGV[4],
  'owner', ARGV[5], 'bytes', 0, 'call', ARGV[6])
return 'OK'
"""

# ARGV: p, node, stream
CLOSE_STREAM = r"""
local skey = p..'s:'..ARGV[3]
if redis.call('EXISTS', skey) == 0 then return 'E:not_found' end
if redis.call('HGET', skey, 'closed') ~= '1' then
  redis.call('HSET', skey, 'closed', 1)
  publish(ARGV[2], {ARGV[3]})
end
return 'OK'
"""

# ARGV: p, node, stream
DELETE_STREAM = r"""
if delete_stream(ARGV[3]) == 0 then return 'E:not_found' end
publish(ARGV[2], {ARGV[3]})
return 'OK'
"""

# ARGV: p, stream, offset, limit, max_bytes (-1: none). Returns {1, closed, next, cut,
# messages} from the list, or {2, closed, next, 0, blocks} from a packed stream, or {0}.
READ = r"""
local f = redis.call('HMGET', p..'s:'..ARGV[2], 'closed', 'next', 'base', 'packed')
if f[2] == false then return {0} end
local offset, limit, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if f[4] == '1' then
  -- packed: the block holding offset and the next few, as (first offset, blob) pairs
  local ikey = p..'mbi:'..ARGV[2]
  local firsts = redis.call('ZREVRANGEBYSCORE', ikey, offset, '-inf', 'LIMIT', 0, 1)
  for _, first in ipairs(redis.call('ZRANGEBYSCORE', ikey, '('..offset, '+inf', 'LIMIT', 0,
      READ_BLOCKS - #firsts)) do
    firsts[#firsts + 1] = first
  end
  local out = {}
  for _, first in ipairs(firsts) do
    out[#out + 1] = tonumber(first)
    out[#out + 1] = redis.call('HGET', p..'mb:'..ARGV[2], first)
  end
  return {2, tonumber(f[1]), tonumber(f[2]), 0, out}
end
local index = math.max(0, offset - tonumber(f[3] or '0'))  -- a fork's list starts at its base
local messages = redis.call('LRANGE', p..'m:'..ARGV[2], index, index + limit - 1)
local cut = 0
if max_bytes >= 0 then
  local size = 0
  for j = 1, #messages do
    size = size + #messages[j]
    if j > 1 and size > max_bytes then
      for k = #messages, j, -1 do messages[k] = nil end
      cut = 1
      break
    end
  end
end
return {1, tonumber(f[1]), tonumber(f[2]), cut, messages}
"""

# ARGV: p, stream, next offset, n, (first offset, blob)…  Replaces a closed stream's list
# with its packed blocks, if it is still as the packer read it. Returns whether it did.
PACK = r"""
local sid = ARGV[2]
local skey = p..'s:'..sid
local f = redis.call('HMGET', skey, 'closed', 'next', 'base', 'packed')
if f[1] ~= '1' or f[2] ~= ARGV[3] or f[4] == '1' then return 0 end
local mkey = p..'m:'..sid
if redis.call('LLEN', mkey) ~= tonumber(f[2]) - tonumber(f[3] or '0') then return 0 end
for j = 5, 4 + 2 * tonumber(ARGV[4]), 2 do
  redis.call('HSET', p..'mb:'..sid, ARGV[j], ARGV[j + 1])
  redis.call('ZADD', p..'mbi:'..sid, ARGV[j], ARGV[j])
end
redis.call('DEL', mkey)
redis.call('HSET', skey, 'packed', 1)
return 1
"""

# ARGV: p, stream. Returns {next, closed} or 'E:not_found'
STREAM_LENGTH = r"""
local f = redis.call('HMGET', p..'s:'..ARGV[2], 'next', 'closed')
if f[1] == false then return 'E:not_found' end
return {tonumber(f[1]), tonumber(f[2])}
"""

# ARGV: p, generation, stream, content type, owner (JSON), created_at, max active of the
# owner (-1: any), call token, n_fields, fields…, has_session_write, session write…  Creates
# the stream, the record and the session write.
CREATE_GENERATION = r"""
local gid, sid = ARGV[2], ARGV[3]
local gkey = p..'g:'..gid
local skey = p..'s:'..sid
if redis.call('EXISTS', skey) == 1 then
  if redis.call('HGET', skey, 'call') == ARGV[8] then return 'OK' end  -- this call, retried
  return 'E:exists'
end
if redis.call('EXISTS', gkey) == 1 then return 'E:exists' end
local most = tonumber(ARGV[7])
if most >= 0 and ARGV[5] ~= 'null' then
  local active = redis.call('SCARD', p..'oa:'..ARGV[5])
  if active >= most then return 'E:max_generations_per_user:'..active end
end
local n = tonumber(ARGV[9])
local after = 10 + 2 * n
if ARGV[after] == '1' then
  local err = session_write(after + 1, gid)  -- checks first: a refusal writes nothing
  if err then return err end
end
redis.call('HSET', skey, 'next', 0, 'closed', 0, 'ct', ARGV[4], 'created', ARGV[6],
  'owner', ARGV[5], 'bytes', 0, 'call', ARGV[8])
redis.call('HSET', gkey, 'text_chars', 0)
set_gen_fields(gid, 10, n)
redis.call('ZADD', p..'gens', ARGV[6], gid)
local owning = str(redis.call('HGET', gkey, 'session_id'))
if owning then
  -- ties of creation time keep creation order: members sort as '<16-digit seq>:<id>'
  local seq = redis.call('INCR', p..'gseq')
  redis.call('ZADD', p..'sg:'..owning, ARGV[6], string.format('%016d:%s', seq, gid))
end
gen_index(gid)
return 'OK'
"""

# ARGV: p, generation, n_fields, fields…
UPDATE_GENERATION = r"""
if redis.call('EXISTS', p..'g:'..ARGV[2]) == 0 then return 'E:not_found' end
set_gen_fields(ARGV[2], 4, tonumber(ARGV[3]))
return 'OK'
"""

# ARGV: p, node, generation, payload, n_allowed, allowed…, check_worker, worker (JSON),
# n_fields, fields…  Returns the generation's stream when it ended it, 0 when a check said
# no.
FINISH_GENERATION = r"""
local gid = ARGV[3]
local gkey = p..'g:'..gid
local g = redis.call('HMGET', gkey, 'stream_id', 'status', 'worker_id')
if g[1] == false then return 'E:not_found' end
local n_allowed = tonumber(ARGV[5])
local allowed = false
for j = 6, 5 + n_allowed do if ARGV[j] == g[2] then allowed = true end end
if not allowed then return 0 end
local k = 6 + n_allowed
if ARGV[k] == '1' and ARGV[k + 1] ~= g[3] then return 0 end
local sid = cjson.decode(g[1])
local skey = p..'s:'..sid
local meta = redis.call('HMGET', skey, 'closed', 'next', 'owner')
if meta[2] ~= false and meta[1] ~= '1' then
  local first = tonumber(meta[2])
  redis.call('RPUSH', p..'m:'..sid, ARGV[4])
  add_bytes(skey, meta[3], #ARGV[4])
  redis.call('HSET', skey, 'next', first + 1, 'closed', 1)
  redis.call('HSET', gkey, 'next_offset', first + 1)
  publish(ARGV[2], {sid})
end
set_gen_fields(gid, k + 3, tonumber(ARGV[k + 2]))
return sid
"""

# ARGV: p, generation, from (JSON), to (JSON), max_continuations, call token, n_allowed,
# allowed…
CLAIM_GENERATION = r"""
local gkey = p..'g:'..ARGV[2]
local g = redis.call('HMGET', gkey, 'status', 'worker_id', 'cancel_requested', 'continuations',
  'claim')
if g[1] == false then return 0 end
if g[5] == ARGV[6] then return 1 end  -- this claim, retried after a lost reply
local allowed = false
for j = 8, 7 + tonumber(ARGV[7]) do if ARGV[j] == g[1] then allowed = true end end
if not allowed or g[2] ~= ARGV[3] or g[3] == 'true' then return 0 end
if tonumber(g[4]) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', gkey, 'worker_id', ARGV[4], 'continuations', tonumber(g[4]) + 1,
  'claim', ARGV[6])
return 1
"""

# ARGV: p, generation, n_allowed, allowed…
REQUEST_CANCEL = r"""
local gkey = p..'g:'..ARGV[2]
local status = redis.call('HGET', gkey, 'status')
if status == false then return 'E:not_found' end
for j = 4, 3 + tonumber(ARGV[3]) do
  if ARGV[j] == status then
    redis.call('HSET', gkey, 'cancel_requested', 'true')
    return 1
  end
end
return 0
"""

# ARGV: p, worker id, record (JSON). Returns whether it was registered before.
HEARTBEAT = r"""
local existed = redis.call('HEXISTS', p..'workers', ARGV[2])
redis.call('HSET', p..'workers', ARGV[2], ARGV[3])
return existed
"""

# ARGV: p, session, owner (JSON), max_open (-1: none), if_absent, call token, n_fields,
# fields…
CREATE_SESSION = r"""
local id = ARGV[2]
local skey = p..'S:'..id
if redis.call('EXISTS', skey) == 1 then
  if redis.call('HGET', skey, 'call') == ARGV[6] then return 1 end  -- this call, retried
  if ARGV[5] == '1' then return 0 end
  return 'E:exists'
end
local maximum = tonumber(ARGV[4])
if maximum >= 0 then
  local err = open_below(ARGV[3], maximum, nil)
  if err then return err end
end
for j = 8, 7 + 2 * tonumber(ARGV[7]), 2 do redis.call('HSET', skey, ARGV[j], ARGV[j + 1]) end
redis.call('HSET', skey, 'msg_bytes', 0, 'call', ARGV[6])
session_index(id)
return 1
"""

# ARGV: p, session, max_open (-1: none), n_fields, fields…
UPDATE_SESSION = r"""
local id = ARGV[2]
local skey = p..'S:'..id
if redis.call('EXISTS', skey) == 0 then return 'E:session_not_found:'..id end
local owner = redis.call('HGET', skey, 'owner')
local maximum = tonumber(ARGV[3])
if maximum >= 0 then
  local err = open_below(owner, maximum, id)
  if err then return err end
end
for j = 5, 4 + 2 * tonumber(ARGV[4]), 2 do redis.call('HSET', skey, ARGV[j], ARGV[j + 1]) end
-- an owner change moves the session between owners' indexes
local now_owner = redis.call('HGET', skey, 'owner')
if now_owner ~= owner then
  redis.call('ZREM', p..'os:'..owner, id)
  redis.call('SREM', p..'oo:'..owner, id)
end
session_index(id)
return 'OK'
"""

# ARGV: p, session write…
SESSION_WRITE = r"""
local err = session_write(2, nil)
if err then return err end
return 'OK'
"""

# ARGV: p, node, session. Returns the deleted streams.
DELETE_SESSION = r"""
local id = ARGV[3]
local skey = p..'S:'..id
if redis.call('EXISTS', skey) == 0 then return 'E:session_not_found:'..id end
local owner = redis.call('HGET', skey, 'owner')
redis.call('ZREM', p..'os:'..owner, id)
redis.call('SREM', p..'oo:'..owner, id)
redis.call('ZREM', p..'idle', id)
redis.call('ZREM', p..'closed', id)
for _, field in ipairs(redis.call('SMEMBERS', p..'SK:'..id)) do
  redis.call('HDEL', p..'keys', field)
end
local changed = {}
for _, member in ipairs(redis.call('ZRANGE', p..'sg:'..id, 0, -1)) do
  local gid = string.match(member, ':(.*)$')
  local g = redis.call('HMGET', p..'g:'..gid, 'stream_id', 'owner')
  local sid = str(g[1])
  if sid and delete_stream(sid) > 0 then changed[#changed + 1] = sid end
  redis.call('DEL', p..'g:'..gid, p..'t:'..gid)
  redis.call('ZREM', p..'gens', gid)
  redis.call('SREM', p..'active', gid)
  if g[2] then redis.call('SREM', p..'oa:'..g[2], gid) end
end
redis.call('DEL', skey, p..'SM:'..id, p..'SK:'..id, p..'sg:'..id, p..'sa:'..id)
publish(ARGV[2], changed)
return changed
"""

# ARGV: p, session. Returns the messages' JSON, each followed by its generation's status
# and text (empty strings for a message of its own).
MESSAGES = r"""
local out = {}
for _, entry in ipairs(redis.call('LRANGE', p..'SM:'..ARGV[2], 0, -1)) do
  out[#out + 1] = entry
  local gid = cjson.decode(entry).generation_id
  if type(gid) == 'string' then
    out[#out + 1] = redis.call('HGET', p..'g:'..gid, 'status') or ''
    out[#out + 1] = redis.call('GET', p..'t:'..gid) or ''
  else
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
end
return out
"""

# ARGV: p, owner (JSON). Stream bytes, then each session's context, title and message bytes.
STORED_BYTES = r"""
local total = tonumber(redis.call('HGET', p..'ob', ARGV[2]) or '0')
for _, id in ipairs(redis.call('ZRANGE', p..'os:'..ARGV[2], 0, -1)) do
  local f = redis.call('HMGET', p..'S:'..id, 'context', 'title', 'msg_bytes')
  if f[1] then total = total + #f[1] end
  if f[2] then total = total + #cjson.decode(f[2]) end
  total = total + tonumber(f[3] or '0')
end
return total
"""
