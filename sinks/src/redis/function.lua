#!lua name=sfs_sink
-- The Redis side of the exactly-once, monotonic feature sink.
--
-- sfs_apply: one atomic batch.
--   KEYS[1]  progress hash     ({prefix}_progress)
--   KEYS[2]  tombstone zset    ({prefix}_tombstones): deleted row key -> _as_of of the delete
--   KEYS[3..] row hashes
--   ARGV[1]  as_of: the frontier (ms) every row of the batch reflects
--   ARGV[2]  fv: feature-set version
--   ARGV[3]  progress frontier (ms), or "" for none
--   ARGV[4]  progress resume offsets (JSON), ignored without a progress frontier
--   ARGV[5..] per row key, in order: n, then n field names and n values
--             (n = 0: the row's windows are empty, delete it)
--
-- A row is written (or deleted) only if it is newer than what is stored:
-- a stored row of the same feature-set version with _as_of >= as_of, or a
-- tombstone at >= as_of, wins. The progress record only moves forward.
-- Tombstones at or before the durable frontier can never win again (every
-- later write is newer), so advancing the progress prunes them.
-- Returns {written, deleted, skipped, progress_applied}.

local function apply(keys, args)
  local as_of = tonumber(args[1])
  local fv = args[2]
  local tombs = keys[2]
  local written, deleted, skipped = 0, 0, 0
  local a = 5
  for k = 3, #keys do
    local key = keys[k]
    local n = tonumber(args[a])
    a = a + 1
    local stored = redis.call('HMGET', key, '_as_of', '_fv')
    local newer
    if stored[1] then
      newer = stored[2] ~= fv or tonumber(stored[1]) < as_of
    else
      local tomb = redis.call('ZSCORE', tombs, key)
      newer = (not tomb) or tonumber(tomb) < as_of
    end
    if not newer then
      skipped = skipped + 1
    elseif n == 0 then
      redis.call('DEL', key)
      redis.call('ZADD', tombs, as_of, key)
      deleted = deleted + 1
    else
      local hset = {key}
      for i = 0, n - 1 do
        hset[#hset + 1] = args[a + i]
        hset[#hset + 1] = args[a + n + i]
      end
      hset[#hset + 1] = '_as_of'
      hset[#hset + 1] = args[1]
      hset[#hset + 1] = '_fv'
      hset[#hset + 1] = fv
      if not stored[1] then
        redis.call('ZREM', tombs, key)
      end
      redis.call('HSET', unpack(hset))
      written = written + 1
    end
    a = a + 2 * n
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

redis.register_function('sfs_apply', function(keys, args) return apply(keys, args) end)
