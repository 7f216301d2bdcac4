#!lua name=sfs_sink_v3
-- The Redis side of the exactly-once, monotonic feature sink.
--
-- sfs_apply_v3: one atomic batch. (Versioned: v2 changed the argument layout,
-- v3 added the write ceiling; a job of another version keeps its own function
-- while both run.)
--   KEYS[1]  progress hash     ({prefix}_progress)
--   KEYS[2]  tombstone zset    ({prefix}_tombstones): deleted row key -> _as_of of the delete
--   KEYS[3..] row hashes
--   ARGV[1]  as_of: the frontier (ms) every row of the batch reflects
--   ARGV[2]  fv: feature-set version
--   ARGV[3]  progress frontier (ms), or "" for none
--   ARGV[4]  progress resume offsets (JSON), ignored without a progress frontier
--   ARGV[5]  s: the number of field-name lists, then per list its length m
--            and m field names (sent once per call, not per row)
--   then, per row key in order: the 1-based index of its field-name list and
--            that list's m values, or 0: the row's windows are empty, delete it
--
-- A row is written (or deleted) only if it is newer than what is stored:
-- a stored row of the same feature-set version with _as_of >= as_of, or a
-- tombstone at >= as_of, wins. The progress record only moves forward.
-- Tombstones at or before the durable frontier can never win again (every
-- later write is newer), so advancing the progress prunes them.
-- Returns {written, deleted, skipped, progress_applied}.
--
-- Every call first raises the write ceiling, `written_ms` in the progress
-- hash, to as_of: an upper bound of the _as_of of every row ever stored under
-- the prefix. A job reads it at start; batches past it are newer than
-- anything stored, so the sink writes them with plain HSET/DEL commands,
-- after one call of this function (with no rows) has raised the ceiling. A
-- progress record of a sink older than the ceiling (frontier_ms without
-- written_ms) leaves the ceiling unset: that prefix is only ever checked.
--
-- Per row: one HMGET (the CAS), a ZSCORE only when the row does not exist,
-- then one HSET of every field; the HSET argument tables are built once per
-- call and only their key and value slots are overwritten per row.

local function raise_ceiling(progress, as_of, text)
  local c = redis.call('HMGET', progress, 'written_ms', 'frontier_ms')
  if (c[1] and tonumber(c[1]) < as_of) or not (c[1] or c[2]) then
    redis.call('HSET', progress, 'written_ms', text)
  end
end

local function apply(keys, args)
  local as_of = tonumber(args[1])
  local fv = args[2]
  local tombs = keys[2]
  raise_ceiling(keys[1], as_of, args[1])
  local written, deleted, skipped = 0, 0, 0
  local a = 5
  local lists = tonumber(args[a])
  a = a + 1
  local hsets, widths = {}, {}
  for s = 1, lists do
    local m = tonumber(args[a])
    a = a + 1
    local t = {''}
    for i = 1, m do
      t[2 * i] = args[a + i - 1]
      t[2 * i + 1] = ''
    end
    t[2 * m + 2] = '_as_of'
    t[2 * m + 3] = args[1]
    t[2 * m + 4] = '_fv'
    t[2 * m + 5] = fv
    hsets[s] = t
    widths[s] = m
    a = a + m
  end
  for k = 3, #keys do
    local key = keys[k]
    local s = tonumber(args[a])
    a = a + 1
    local m = 0
    if s > 0 then
      m = widths[s]
    end
    local stored = redis.call('HMGET', key, '_as_of', '_fv')
    local newer, tomb
    if stored[1] then
      newer = stored[2] ~= fv or tonumber(stored[1]) < as_of
    else
      tomb = redis.call('ZSCORE', tombs, key)
      newer = (not tomb) or tonumber(tomb) < as_of
    end
    if not newer then
      skipped = skipped + 1
    elseif s == 0 then
      redis.call('DEL', key)
      redis.call('ZADD', tombs, as_of, key)
      deleted = deleted + 1
    else
      local t = hsets[s]
      t[1] = key
      for i = 1, m do
        t[2 * i + 1] = args[a + i - 1]
      end
      if tomb then
        redis.call('ZREM', tombs, key)
      elseif stored[1] and stored[2] ~= fv then
        -- Another feature set's row: drop its fields, not just overwrite.
        redis.call('DEL', key)
      end
      redis.call('HSET', unpack(t))
      written = written + 1
    end
    a = a + m
  end

  local progressed = 0
  if args[3] ~= '' then
    local frontier = tonumber(args[3])
    local current = redis.call('HMGET', keys[1], 'frontier_ms', 'fv')
    if (not current[1]) or current[2] ~= fv or tonumber(current[1]) < frontier then
      local now = redis.call('TIME')
      redis.call('HSET', keys[1], 'frontier_ms', args[3], 'fv', fv, 'offsets', args[4],
        'updated_ms', tostring(now[1] * 1000 + math.floor(now[2] / 1000)))
      redis.call('ZREMRANGEBYSCORE', tombs, '-inf', frontier)
      progressed = 1
    end
  end
  return {written, deleted, skipped, progressed}
end

redis.register_function('sfs_apply_v3', function(keys, args) return apply(keys, args) end)
