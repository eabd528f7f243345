"""The Lua scripts of named streams on Redis (the Durable Streams view's primitives), the same
rules as ``store/_named.py`` on SQLite, each check-and-write one script.

A named stream is a stream (``s:<id>`` and ``m:<id>``, see ``_lua``) whose hash also holds
``name`` (its ``<owner>/<name>`` key), ``base`` (a fork's first own offset: message ``n`` is
list index ``n - base``), ``from`` (the fork's source), ``sub`` (its fork sub-offset),
``ttl``, ``exp_at`` (its absolute expiry as asked), ``expiry`` (when it expires, as far as
this store knows), ``deleted`` (0, 1 soft-deleted, 2 expired but kept for forks), ``seq``
(the last ``Stream-Seq``) and ``closed_by`` (the producer append that closed it, JSON).
``names`` maps keys to ids, ``fk:<id>`` holds a stream's forks, ``pr:<id>`` its producers
(``<epoch> <seq>``), and ``expiry`` (zset) the streams due to expire by time.

Times and touches arrive as strings; an empty string is "none".
"""

from __future__ import annotations

NAMED_PRELUDE = r"""
-- A retirement (expiry, delete) can happen in passing, in any script of any node: it is
-- announced to every node, the writing one included, whose readers then find it gone.
local EVERY_NODE = '*'
local function row(sid)
  local f = redis.call('HMGET', p..'s:'..sid, 'ct', 'closed', 'base', 'from', 'sub', 'ttl',
    'exp_at', 'expiry', 'deleted', 'seq', 'closed_by', 'next', 'name')
  if f[12] == false then return nil end
  return {id = sid, ct = f[1], closed = f[2] == '1', base = tonumber(f[3] or '0'),
    from = f[4] or '', sub = tonumber(f[5] or '0'), ttl = f[6] or '', exp_at = f[7] or '',
    expiry = f[8] or '', deleted = tonumber(f[9] or '0'), seq = f[10] or '',
    closed_by = f[11] or '', next = tonumber(f[12]), name = f[13] or ''}
end
local function named(key)
  local sid = redis.call('HGET', p..'names', key)
  if not sid then return nil end
  return row(sid)
end
local function expired(r, now, touched)
  if r.expiry == '' then return false end
  local expiry = tonumber(r.expiry)
  if touched ~= '' and r.ttl ~= '' then
    expiry = math.max(expiry, tonumber(touched) + tonumber(r.ttl))
  end
  return tonumber(now) >= expiry
end
local function has_forks(sid) return redis.call('SCARD', p..'fk:'..sid) > 0 end
local function hard_delete(node, r)
  while true do
    delete_stream(r.id)
    if r.name ~= '' and redis.call('HGET', p..'names', r.name) == r.id then
      redis.call('HDEL', p..'names', r.name)
    end
    redis.call('DEL', p..'pr:'..r.id, p..'fk:'..r.id)
    redis.call('ZREM', p..'expiry', r.id)
    publish(EVERY_NODE, {r.id})
    if r.from == '' then return end
    redis.call('SREM', p..'fk:'..r.from, r.id)
    local source = row(r.from)
    if source == nil or source.deleted == 0 or has_forks(source.id) then return end
    r = source
  end
end
-- remove a stream; while forks read it, keep it for them as kept_as (1 soft, 2 expired)
local function retire(node, r, kept_as)
  if not has_forks(r.id) then
    hard_delete(node, r)
    return
  end
  redis.call('HSET', p..'s:'..r.id, 'deleted', kept_as, 'expiry', '')
  redis.call('ZREM', p..'expiry', r.id)
  if kept_as == 2 and redis.call('HGET', p..'names', r.name) == r.id then
    redis.call('HDEL', p..'names', r.name)
  end
  publish(EVERY_NODE, {r.id})
end
local function load_unexpired(node, key, now, touched)
  local r = named(key)
  if r ~= nil and expired(r, now, touched) then
    retire(node, r, 2)
    return nil
  end
  return r
end
-- (stream, first offset) from the root of the fork chain to the stream itself, flattened
local function segments(r)
  local chain = {{r.id, r.base}}
  local limit = r.base
  local source = r.from
  while source ~= '' do
    local f = redis.call('HMGET', p..'s:'..source, 'base', 'from')
    if f[1] == false and f[2] == false then break end
    local base = tonumber(f[1] or '0')
    if base < limit then
      chain[#chain + 1] = {source, base}
      limit = base
    end
    source = f[2] or ''
  end
  local flat = {}
  for i = #chain, 1, -1 do
    flat[#flat + 1] = chain[i][1]
    flat[#flat + 1] = chain[i][2]
  end
  return flat
end
local function info(r)
  local fresh = row(r.id)
  local closed = 0
  if fresh.closed then closed = 1 end
  return {fresh.id, fresh.ct, closed, fresh.next, fresh.ttl, fresh.exp_at, fresh.expiry,
    segments(fresh)}
end
local function media(ct)
  local m = string.lower(string.match(ct, '^%s*([^;]*)'))
  return (string.gsub(m, '%s+$', ''))
end
-- byte order, whatever the server's collation locale
local function bytes_le(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
"""

# ARGV: p, node, key, now, touched. Returns 'E:not_found', 'E:gone', or the info
# (expiring the stream when it is due).
NAMED_INFO = r"""
local r = named(ARGV[3])
if r == nil then return 'E:not_found' end
if r.deleted == 1 then return 'E:gone' end
if expired(r, ARGV[4], ARGV[5]) then
  retire(ARGV[2], r, 2)
  return 'E:not_found'
end
return info(r)
"""

# ARGV: p, node, key, source key ('' none), now, touched (existing), touched (source),
# content type, ttl, expires at, closed, fork offset, fork sub-offset, sub-offset prefix
# ('' none), new id, owner (JSON), default content type, n_payloads, payloads…
# Returns {created (0/1), info…} or an error.
NAMED_CREATE = r"""
local node, key, source_key, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ct, ttl, exp_at, closed = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local fork_offset, fork_sub, prefix, sid = ARGV[12], tonumber(ARGV[13]), ARGV[14], ARGV[15]
local owner, default_ct = ARGV[16], ARGV[17]
local existing = load_unexpired(node, key, now, ARGV[6])
local source = nil
if source_key ~= '' then
  source = load_unexpired(node, source_key, now, ARGV[7])
  if source == nil then return 'E:source_not_found' end
  if source.deleted == 1 then return 'E:config:the fork source was deleted' end
end
if existing ~= nil then
  if existing.deleted == 1 then
    return 'E:config:the stream was deleted and is kept for its forks; its name is taken'
      ..' until they are gone'
  end
  local inherits = existing.from ~= ''
  local wanted = ct
  if wanted == '' then
    if inherits then wanted = existing.ct else wanted = default_ct end
  end
  local same_expiry = (inherits and ttl == '' and exp_at == '')
    or (ttl == existing.ttl and exp_at == existing.exp_at)
  local source_id = ''
  if source ~= nil then source_id = source.id end
  local same = media(wanted) == media(existing.ct) and same_expiry
    and (closed == '1') == existing.closed and source_id == existing.from
    and (fork_offset == '' or tonumber(fork_offset) == existing.base)
    and fork_sub == existing.sub
  if not same then return 'E:config:the stream exists with a different configuration' end
  local out = info(existing)
  table.insert(out, 1, 0)
  return out
end
local base = 0
local from = ''
if source ~= nil then
  if ct ~= '' and media(ct) ~= media(source.ct) then return 'E:ct_mismatch:'..source.ct end
  ct = source.ct
  base = source.next
  if fork_offset ~= '' then base = tonumber(fork_offset) end
  if base > source.next then
    return 'E:invalid_fork:fork offset '..base..' is beyond the source\'s end ('..source.next..')'
  end
  if fork_sub > 0 and prefix == '' then
    return 'E:invalid_fork:Stream-Fork-Sub-Offset needs a message at the fork offset'
  end
  if ttl == '' and exp_at == '' then ttl, exp_at = source.ttl, source.exp_at end
  from = source.id
  redis.call('SADD', p..'fk:'..from, sid)
end
if ct == '' then ct = default_ct end
local expiry = ''
if exp_at ~= '' then expiry = exp_at elseif ttl ~= '' then
  expiry = tostring(tonumber(now) + tonumber(ttl))
end
local skey = p..'s:'..sid
redis.call('HSET', skey, 'next', base, 'closed', 0, 'ct', ct, 'created', now, 'owner', owner,
  'bytes', 0, 'base', base, 'from', from, 'sub', fork_sub, 'ttl', ttl, 'exp_at', exp_at,
  'expiry', expiry, 'deleted', 0, 'seq', '', 'closed_by', '', 'name', key)
if expiry ~= '' then redis.call('ZADD', p..'expiry', expiry, sid) end
redis.call('HSET', p..'names', key, sid)
local n = tonumber(ARGV[18])
local payloads = {}
if fork_sub > 0 then payloads[#payloads + 1] = prefix end
for j = 19, 18 + n do
  if #ARGV[j] > 0 then payloads[#payloads + 1] = ARGV[j] end
end
local size = 0
for _, payload in ipairs(payloads) do
  redis.call('RPUSH', p..'m:'..sid, payload)
  size = size + #payload
end
redis.call('HSET', skey, 'next', base + #payloads)
add_bytes(skey, owner, size)
if closed == '1' then redis.call('HSET', skey, 'closed', 1) end
publish(node, {sid})
local out = info(row(sid))
table.insert(out, 1, 1)
return out
"""

# ARGV: p, node, key, now, touched, content type ('' none), has payload, payload, close,
# seq ('' none), has producer, producer id, epoch, producer seq.
# Returns {next, closed, duplicate, epoch ('' none), seq ('' none)[, stream written]} or an
# error.
NAMED_APPEND = r"""
local node, key, now, touched = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ct, has_payload, payload, close, seq = ARGV[6], ARGV[7] == '1', ARGV[8], ARGV[9] == '1',
  ARGV[10]
local has_producer, pid = ARGV[11] == '1', ARGV[12]
local epoch, pseq = tonumber(ARGV[13]), tonumber(ARGV[14])
local r = load_unexpired(node, key, now, touched)
if r == nil then return 'E:not_found' end
if r.deleted == 1 then return 'E:gone' end
local state = nil
if has_producer then
  local raw = redis.call('HGET', p..'pr:'..r.id, pid)
  if raw then
    local e, s = string.match(raw, '(%d+) (%d+)')
    state = {tonumber(e), tonumber(s)}
  end
end
if r.closed then
  if has_producer then
    if r.closed_by == cjson.encode({pid, epoch, pseq}) then
      return {r.next, 1, 1, epoch, pseq}
    end
    if state ~= nil and epoch < state[1] then return 'E:stale_epoch:'..state[1] end
  elseif not has_payload then
    return {r.next, 1, 0, '', ''}
  end
  return 'E:closed:'..r.next
end
if has_payload and ct ~= '' and media(ct) ~= media(r.ct) then
  return 'E:ct_mismatch:'..r.ct
end
if has_producer then
  if state == nil then
    if pseq ~= 0 then return 'E:seq_gap:0' end
  elseif epoch < state[1] then return 'E:stale_epoch:'..state[1]
  elseif epoch > state[1] then
    if pseq ~= 0 then return 'E:epoch_seq' end
  elseif pseq <= state[2] then return {r.next, 0, 1, state[1], state[2]}
  elseif pseq ~= state[2] + 1 then return 'E:seq_gap:'..(state[2] + 1)
  end
end
if seq ~= '' and r.seq ~= '' and bytes_le(seq, r.seq) then
  return 'E:seq_conflict:'..r.seq
end
local skey = p..'s:'..r.id
local next_offset = r.next
if has_payload then
  redis.call('RPUSH', p..'m:'..r.id, payload)
  next_offset = next_offset + 1
  add_bytes(skey, redis.call('HGET', skey, 'owner'), #payload)
end
local closed_by = ''
if close and has_producer then closed_by = cjson.encode({pid, epoch, pseq}) end
redis.call('HSET', skey, 'next', next_offset, 'closed_by', closed_by)
if close then redis.call('HSET', skey, 'closed', 1) end
if seq ~= '' then redis.call('HSET', skey, 'seq', seq) end
if r.ttl ~= '' then
  local expiry = tostring(tonumber(now) + tonumber(r.ttl))
  redis.call('HSET', skey, 'expiry', expiry)
  redis.call('ZADD', p..'expiry', expiry, r.id)
end
if has_producer then redis.call('HSET', p..'pr:'..r.id, pid, epoch..' '..pseq) end
publish(node, {r.id})
local closed_flag = 0
if close then closed_flag = 1 end
if has_producer then return {next_offset, closed_flag, 0, epoch, pseq, r.id} end
return {next_offset, closed_flag, 0, '', '', r.id}
"""

# ARGV: p, node, stream. Soft-deletes while forks read it.
NAMED_DELETE = r"""
local r = row(ARGV[3])
if r == nil or r.deleted == 2 then return 'E:not_found' end
if r.deleted == 1 then return 'E:gone' end
retire(ARGV[2], r, 1)
return 'OK'
"""

# ARGV: p, node, now, n, (stream, touched)…  Slides the touched TTLs, then retires every
# stream due. Returns how many expired.
NAMED_SWEEP = r"""
local node, now = ARGV[2], ARGV[3]
for j = 5, 4 + 2 * tonumber(ARGV[4]), 2 do
  local r = row(ARGV[j])
  if r ~= nil and r.ttl ~= '' and r.deleted == 0 then
    local slid = tonumber(ARGV[j + 1]) + tonumber(r.ttl)
    if r.expiry == '' or slid > tonumber(r.expiry) then
      redis.call('HSET', p..'s:'..r.id, 'expiry', tostring(slid))
      redis.call('ZADD', p..'expiry', tostring(slid), r.id)
    end
  end
end
local due = redis.call('ZRANGEBYSCORE', p..'expiry', '-inf', now)
for _, sid in ipairs(due) do
  local r = row(sid)  -- a cascade may have removed it already
  if r ~= nil then retire(node, r, 2) else redis.call('ZREM', p..'expiry', sid) end
end
return #due
"""
