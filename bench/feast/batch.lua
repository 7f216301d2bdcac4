-- wrk script: POST /get-online-features for BATCH random cards of c0..c{CARDS-1},
-- the features in FEATURES (a JSON array). Same body shape for Feast and sfs.
local cards = tonumber(os.getenv("CARDS") or "10000")
local batch = tonumber(os.getenv("BATCH") or "1")
local features = os.getenv("FEATURES")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local ids = {}
  for i = 1, batch do ids[i] = '"c' .. math.random(0, cards - 1) .. '"' end
  return wrk.format(nil, "/get-online-features", nil,
    '{"features":' .. features .. ',"entities":{"card_id":[' .. table.concat(ids, ",") .. ']}}')
end
done = function(summary, latency, requests)
  io.write(string.format("WRK {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"non2xx\":%d,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f}\n",
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
