"""The Lua scripts that make the Redis store atomic: claim, heartbeat, release, publish, retire, and
the lease reaper every script runs first (`lua_reads.py` has the lookups).

Kept as Python strings (not .lua files) so they ship with the package without package-data rules.
Each script's header documents its KEYS, ARGV and reply; `redis.py` owns the key layout:

    P:names                     SET   every model name (published or claimed)
    P:m:N:versions              ZSET  version numbers of model N (member = score = the number)
    P:m:N:claims                HASH  rank -> "<claimed_at>|<agent name>"
    P:m:N:leases                ZSET  rank -> lease expiry (Redis TIME, unix seconds); leased claims only
    P:m:N:lease_s               HASH  rank -> lease length in seconds; leased claims only
    P:m:N:pruned                STRING the highest version number retention deleted (absent: none)
    P:m:N:gen                   HASH  n (changes to READY versions: a version made READY or a part
                                      republished into one, a retire, a lease's kill) and epoch (Redis
                                      TIME when n was 1): the model's generation, under which the
                                      catalog caches Resolve replies of READY versions; absent until then
    P:m:N:v:<version>           HASH  state, world_size, model (ModelMeta protobuf), created_at, ready_at,
                                      layout (the version's layout digest; absent until every rank
                                      published, and in versions written before digests existed),
                                      dead ("1,3": READY, ranks whose lease lapsed) and failure (why
                                      FAILED / which ranks died); both absent until set
    P:m:N:v:<version>:sources   HASH  rank -> SourceRecord protobuf
    P:m:N:v:<version>:heads     HASH  rank -> SourceRecord protobuf without tensors (what Resolve sends
                                      when the caller's known layout matches)
    P:m:N:v:<version>:layouts   HASH  rank -> source layout digest (SHA-256 hex)
    P:m:N:v:<version>:agents    HASH  rank -> agent name that published the part

P is the configured prefix and N the URL-quoted model name (so a ':' in a name cannot alias another
key). The scripts target one Redis instance, not Redis Cluster: publish touches the global names set
and retire builds keys it was not passed. The read-only scripts (latest, resolve, the reaper alone and
the generation) are in `lua_reads.py`. The order of publish's checks is the one `stores.base`
defines; the Python side turns each non-"ok" reply into the shared error.

Leases: every script's last ARGV is the model's key prefix `P:m:N`, and every script first runs
`refit_reap` on it (the `LEASES` functions, prepended): a lease past its expiry by Redis's own clock
(TIME, so several catalog servers sharing Redis agree) drops its claim and kills its rank, exactly as
`stores.base` defines, inside the same atomic script. Reads that are pipelines run `REAP` first in
their MULTI.
"""

from __future__ import annotations

LEASES = """
local function refit_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function refit_fail(key, reason)
  local f = redis.call('HGET', key, 'failure')
  if f then reason = f .. '; ' .. reason end
  redis.call('HSET', key, 'failure', reason)
end
-- A change a read could see: the model's generation moves on. The epoch is set when the count starts,
-- so a generation never repeats, even where Redis lost the hash and counts again.
local function refit_changed(m)
  if redis.call('HINCRBY', m .. ':gen', 'n', 1) == 1 then
    local t = redis.call('TIME')
    redis.call('HSET', m .. ':gen', 'epoch', t[1] .. '.' .. t[2])
  end
end
-- The rank's publishing agent is gone: its STAGING versions FAIL, its READY parts are dead.
local function refit_kill(m, rank, agent)
  local reason = 'rank ' .. rank .. " (agent '" .. agent .. "') lost its lease"
  refit_changed(m)
  for _, v in ipairs(redis.call('ZRANGE', m .. ':versions', 0, -1)) do
    local key = m .. ':v:' .. v
    local st = redis.call('HMGET', key, 'state', 'world_size')
    if st[1] == 'STAGING' and tonumber(rank) < tonumber(st[2]) then
      redis.call('HSET', key, 'state', 'FAILED')
      refit_fail(key, reason)
    elseif st[1] == 'READY' and redis.call('HGET', key .. ':agents', rank) == agent then
      local dead, seen = {}, false
      for r in string.gmatch(redis.call('HGET', key, 'dead') or '', '%d+') do
        table.insert(dead, tonumber(r))
        if tonumber(r) == tonumber(rank) then seen = true end
      end
      if not seen then
        table.insert(dead, tonumber(rank))
        table.sort(dead)
        redis.call('HSET', key, 'dead', table.concat(dead, ','))
        refit_fail(key, reason)
      end
    end
  end
end
-- Drop every lapsed lease of model m (expiry < now) and kill its rank, in rank order.
local function refit_reap(m)
  local now = refit_now()
  local expired = redis.call('ZRANGEBYSCORE', m .. ':leases', '-inf', '(' .. string.format('%.6f', now))
  table.sort(expired, function(a, b) return tonumber(a) < tonumber(b) end)
  for _, rank in ipairs(expired) do
    local cur = redis.call('HGET', m .. ':claims', rank)
    redis.call('ZREM', m .. ':leases', rank)
    redis.call('HDEL', m .. ':lease_s', rank)
    if cur then
      redis.call('HDEL', m .. ':claims', rank)
      refit_kill(m, rank, string.sub(cur, string.find(cur, '|', 1, true) + 1))
    end
  end
  return now
end
local M = ARGV[#ARGV]
refit_reap(M)
"""

CLAIM = (
    LEASES
    + """
-- claim: hold one trainer rank of a model for an agent.
-- KEYS[1]  claims hash of the model (rank -> "<claimed_at>|<agent>")
-- KEYS[2]  names set (a claimed model is known, so the metrics find its claims)
-- ARGV[1]  rank
-- ARGV[2]  agent name
-- ARGV[3]  "1" to take the rank over from another agent, else "0"
-- ARGV[4]  now (unix seconds, the server's clock)
-- ARGV[5]  lease seconds ("0": no lease)
-- ARGV[6]  model name
-- ARGV[7]  the model's key prefix (the reaper's; always the last argument)
-- Reply:   {"ok", claimed_at, previous holder or "", lease expiry or "0"} | {"taken", holder}
-- The holder re-claiming keeps its original claimed_at (idempotent) and restarts its lease.
local claimed_at, prev = ARGV[4], ''
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  local holder = string.sub(cur, sep + 1)
  if holder == ARGV[2] then
    claimed_at = string.sub(cur, 1, sep - 1)
  elseif ARGV[3] ~= '1' then
    return {'taken', holder}
  else
    prev = holder
  end
end
redis.call('HSET', KEYS[1], ARGV[1], claimed_at .. '|' .. ARGV[2])
redis.call('SADD', KEYS[2], ARGV[6])
local expires = '0'
if tonumber(ARGV[5]) > 0 then
  expires = string.format('%.6f', refit_now() + tonumber(ARGV[5]))
  redis.call('ZADD', M .. ':leases', expires, ARGV[1])
  redis.call('HSET', M .. ':lease_s', ARGV[1], ARGV[5])
else
  redis.call('ZREM', M .. ':leases', ARGV[1])
  redis.call('HDEL', M .. ':lease_s', ARGV[1])
end
return {'ok', claimed_at, prev, expires}
"""
)

HEARTBEAT = (
    LEASES
    + """
-- heartbeat: renew the holder's lease for its lease length.
-- KEYS[1]  claims hash of the model
-- ARGV[1]  rank
-- ARGV[2]  agent name
-- ARGV[3]  the model's key prefix (the reaper's)
-- Reply:   {"ok", claimed_at, lease seconds or "0", lease expiry or "0"} | {"lost", holder or ""}
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return {'lost', ''} end
local sep = string.find(cur, '|', 1, true)
local holder = string.sub(cur, sep + 1)
if holder ~= ARGV[2] then return {'lost', holder} end
local len = redis.call('HGET', M .. ':lease_s', ARGV[1])
local expires = '0'
if len then
  expires = string.format('%.6f', refit_now() + tonumber(len))
  redis.call('ZADD', M .. ':leases', expires, ARGV[1])
end
return {'ok', string.sub(cur, 1, sep - 1), len or '0', expires}
"""
)

RELEASE = (
    LEASES
    + """
-- release: drop an agent's claim (and its lease) on one rank; any other holder's claim is left alone.
-- KEYS[1]  claims hash of the model
-- ARGV[1]  rank
-- ARGV[2]  agent name
-- ARGV[3]  the model's key prefix (the reaper's)
-- Reply:   1 if released, 0 if the agent did not hold the rank
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, string.find(cur, '|', 1, true) + 1) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', M .. ':leases', ARGV[1])
  redis.call('HDEL', M .. ':lease_s', ARGV[1])
  return 1
end
return 0
"""
)

PUBLISH = (
    LEASES
    + """
-- publish: add (or replace) one rank's part of a version; create the version in STAGING on the first
-- part and flip it to READY when every rank 0..world_size-1 has a part.
-- KEYS[1]  version hash   (state, world_size, model, created_at, ready_at)
-- KEYS[2]  sources hash   (rank -> SourceRecord protobuf)
-- KEYS[3]  agents hash    (rank -> publishing agent)
-- KEYS[4]  claims hash of the model
-- KEYS[5]  versions zset of the model
-- KEYS[6]  names set
-- KEYS[7]  layouts hash   (rank -> source layout digest)
-- KEYS[8]  heads hash     (rank -> SourceRecord protobuf without tensors)
-- ARGV[1]  name            ARGV[2]  version          ARGV[3]  world_size (decimal)
-- ARGV[4]  model bytes     ARGV[5]  rank             ARGV[6]  agent name
-- ARGV[7]  source bytes    ARGV[8]  now              ARGV[9]  source layout digest
-- ARGV[10] head bytes       ARGV[11] the model's key prefix (the reaper's)
-- KEYS[9]  pruned key of the model (the highest version number retention deleted)
-- The caller guarantees rank < world_size, so HLEN(agents) == world_size means every rank published.
-- Once every rank has a layout digest, the version's layout digest is SHA-1 over exactly the bytes
-- stores.base.version_layout hashes (keep the two in step); until then the field is absent.
-- Reply:   {"ok", state, created_at, ready_at, rank...}
--        | {"retired"} | {"failed", failure} | {"conflict", world_size, model bytes} | {"claimed", holder}
--        | {"published", holder}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  -- A version retention deleted was RETIRED, and RETIRED is final.
  local floor = redis.call('GET', KEYS[9])
  if floor and tonumber(ARGV[2]) <= tonumber(floor) then return {'retired'} end
end
if state then
  if state == 'RETIRED' then return {'retired'} end
  if state == 'FAILED' then return {'failed', redis.call('HGET', KEYS[1], 'failure') or ''} end
  local stored = redis.call('HMGET', KEYS[1], 'world_size', 'model')
  if stored[1] ~= ARGV[3] or stored[2] ~= ARGV[4] then return {'conflict', stored[1], stored[2]} end
end
local claim = redis.call('HGET', KEYS[4], ARGV[5])
if claim then
  local holder = string.sub(claim, string.find(claim, '|', 1, true) + 1)
  if holder ~= ARGV[6] then return {'claimed', holder} end
end
if state then
  local prev = redis.call('HGET', KEYS[3], ARGV[5])
  if prev and prev ~= ARGV[6] then return {'published', prev} end
else
  state = 'STAGING'
  redis.call('HSET', KEYS[1], 'state', state, 'world_size', ARGV[3], 'model', ARGV[4],
             'created_at', ARGV[8], 'ready_at', '0')
  redis.call('ZADD', KEYS[5], ARGV[2], ARGV[2])
  redis.call('SADD', KEYS[6], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[5], ARGV[7])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[7], ARGV[5], ARGV[9])
redis.call('HSET', KEYS[8], ARGV[5], ARGV[10])
if state == 'STAGING' and redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[3]) then
  state = 'READY'
  redis.call('HSET', KEYS[1], 'state', state, 'ready_at', ARGV[8])
end
local layout = ''
if redis.call('HLEN', KEYS[7]) == tonumber(ARGV[3]) then
  local flat = redis.call('HGETALL', KEYS[7])
  local ranks = {}
  for i = 1, #flat, 2 do table.insert(ranks, {tonumber(flat[i]), flat[i], flat[i + 1]}) end
  table.sort(ranks, function(a, b) return a[1] < b[1] end)
  local parts = {'refit-layout-v1', ARGV[3], string.len(ARGV[4]) .. ':' .. ARGV[4]}
  for _, r in ipairs(ranks) do table.insert(parts, r[2] .. '=' .. r[3]) end
  layout = redis.sha1hex(table.concat(parts, '\\n'))
end
-- Never stored empty: LATEST separates its reply's parts with "" because no field or value is empty.
if layout == '' then redis.call('HDEL', KEYS[1], 'layout') else redis.call('HSET', KEYS[1], 'layout', layout) end
-- A part of a STAGING version changes no READY version's reply (only READY ones are cached).
if state == 'READY' then refit_changed(M) end
local reply = redis.call('HMGET', KEYS[1], 'state', 'created_at', 'ready_at')
table.insert(reply, 1, 'ok')
for _, r in ipairs(redis.call('HKEYS', KEYS[3])) do table.insert(reply, r) end
return reply
"""
)

RETIRE = (
    LEASES
    + """
-- retire: mark a version (and optionally every older one) RETIRED (a FAILED version stays FAILED),
-- then delete the model's RETIRED versions beyond the newest `keep` (retention) with every key of theirs.
-- KEYS[1]  versions zset of the model
-- KEYS[2]  pruned key of the model (the highest version number retention deleted)
-- ARGV[1]  version
-- ARGV[2]  "1" to also retire every older version, else "0"
-- ARGV[3]  prefix of the model's version-hash keys (key = prefix .. number)
-- ARGV[4]  keep: how many RETIRED versions to keep, or "" to keep every version
-- ARGV[5]  the model's key prefix (the reaper's; always the last argument)
-- The older versions' keys are built from ARGV[3] because they are only known inside the script
-- (fine on one Redis instance; not Redis Cluster safe).
-- Reply:   {"not_found"} (unknown version, ARGV[2] == "0")
--        | {"ok", number of changed versions, changed version... ascending, deleted version... ascending}
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not known and ARGV[2] ~= '1' then
  local floor = redis.call('GET', KEYS[2])
  if floor and tonumber(ARGV[1]) <= tonumber(floor) then return {'ok', '0'} end  -- retired and deleted already
  return {'not_found'}
end
local targets = {ARGV[1]}
if ARGV[2] == '1' then targets = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) end
local changed = {}
for _, v in ipairs(targets) do
  local key = ARGV[3] .. v
  local state = redis.call('HGET', key, 'state')
  if state ~= 'RETIRED' and state ~= 'FAILED' then
    redis.call('HSET', key, 'state', 'RETIRED')
    table.insert(changed, v)
  end
end
local reply = {'ok', tostring(#changed)}
for _, v in ipairs(changed) do table.insert(reply, v) end
if ARGV[4] ~= '' then
  local keep, seen, deleted = tonumber(ARGV[4]), 0, {}
  for _, v in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
    local key = ARGV[3] .. v
    if redis.call('HGET', key, 'state') == 'RETIRED' then
      seen = seen + 1
      if seen > keep then
        redis.call('DEL', key, key .. ':sources', key .. ':heads', key .. ':layouts', key .. ':agents')
        redis.call('ZREM', KEYS[1], v)
        table.insert(deleted, 1, v)
      end
    end
  end
  if #deleted > 0 then
    local floor = tonumber(redis.call('GET', KEYS[2]) or '-1')
    if tonumber(deleted[#deleted]) > floor then redis.call('SET', KEYS[2], deleted[#deleted]) end
  end
  for _, v in ipairs(deleted) do table.insert(reply, v) end
end
if #reply > 2 then refit_changed(M) end
return reply
"""
)
