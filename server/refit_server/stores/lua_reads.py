"""The Redis store's read-only Lua scripts: the latest and resolve lookups, the lease reaper alone (run
first in the MULTI of a read that is a pipeline) and the model's generation. Each runs the lease reaper
first, as every script does (`lua.py`, whose header documents the key layout and the convention: the
model's key prefix is the last ARGV).
"""

from __future__ import annotations

from refit_server.stores.lua import LEASES

LATEST = (
    LEASES
    + """
-- latest: the highest-numbered version of a model in a given state, read atomically.
-- KEYS[1]  versions zset of the model
-- ARGV[1]  state ("STAGING", "READY" or "RETIRED")
-- ARGV[2]  prefix of the model's version-hash keys (key = prefix .. number; agents = key .. ":agents")
-- ARGV[3]  the model's key prefix (the reaper's)
-- Reply:   {} if none | {version, HGETALL of the version hash (flat), "", rank...}
local versions = redis.call('ZREVRANGE', KEYS[1], 0, -1)
for _, v in ipairs(versions) do
  local key = ARGV[2] .. v
  if redis.call('HGET', key, 'state') == ARGV[1] then
    local reply = {v}
    for _, x in ipairs(redis.call('HGETALL', key)) do table.insert(reply, x) end
    table.insert(reply, '')
    for _, r in ipairs(redis.call('HKEYS', key .. ':agents')) do table.insert(reply, r) end
    return reply
  end
end
return {}
"""
)

RESOLVE = (
    LEASES
    + """
-- resolve: a version with its sources, read atomically (one round trip for a receiver's refit).
-- KEYS[1]  versions zset of the model
-- ARGV[1]  version number, or "" for the newest READY version
-- ARGV[2]  prefix of the model's version-hash keys (key = prefix .. number; + ":agents", ":sources", ":heads")
-- ARGV[3]  the caller's known layout digest ("" never matches)
-- ARGV[4..#ARGV-1] only these ranks' records (none: every rank's)
-- ARGV[#ARGV] the model's key prefix (the reaper's; always the last argument)
-- KEYS[2]  pruned key of the model (the highest version number retention deleted)
-- Reply:   {} if not found | {"deleted"} if ARGV[1] names a version retention deleted
--        | {version, omitted ("1": heads sent, "0": full records), n, HGETALL of the version hash (n
--           items), m, the agents' ranks (m items), record...}
local v = nil
if ARGV[1] == '' then
  for _, n in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
    if redis.call('HGET', ARGV[2] .. n, 'state') == 'READY' then v = n break end
  end
  if not v then return {} end
else
  v = ARGV[1]
  if redis.call('EXISTS', ARGV[2] .. v) == 0 then
    local floor = redis.call('GET', KEYS[2])
    if floor and tonumber(v) <= tonumber(floor) then return {'deleted'} end
    return {}
  end
end
local key = ARGV[2] .. v
local fields = redis.call('HGETALL', key)
local ranks = redis.call('HKEYS', key .. ':agents')
local layout = redis.call('HGET', key, 'layout')
local omitted = '0'
if ARGV[3] ~= '' and layout == ARGV[3] then omitted = '1' end
local records = {}
local hash = key .. (omitted == '1' and ':heads' or ':sources')
if #ARGV > 4 then
  -- HMGET: only the records asked for leave Redis; a rank the version lacks comes back as false.
  for _, b in ipairs(redis.call('HMGET', hash, unpack(ARGV, 4, #ARGV - 1))) do
    if b then table.insert(records, b) end
  end
else
  records = redis.call('HVALS', hash)
end
local reply = {v, omitted, tostring(#fields)}
for _, x in ipairs(fields) do table.insert(reply, x) end
table.insert(reply, tostring(#ranks))
for _, r in ipairs(ranks) do table.insert(reply, r) end
for _, b in ipairs(records) do table.insert(reply, b) end
return reply
"""
)

REAP = (
    LEASES
    + """
-- reap: only the lease reaper, run first in the MULTI of a read that is a pipeline.
-- ARGV[1]  the model's key prefix
-- Reply:   1
return 1
"""
)

GENERATION = (
    LEASES
    + """
-- generation: the model's generation (see refit_changed), after the reaper ran.
-- ARGV[1]  the model's key prefix (the reaper's)
-- Reply:   {n, epoch} (each false while the model never changed)
return redis.call('HMGET', M .. ':gen', 'n', 'epoch')
"""
)
