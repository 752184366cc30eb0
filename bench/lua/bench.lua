-- wrk script shared by every path.
--   WRK_ABS_URL  when set, send this absolute-form request-target (for an explicit
--                forward proxy: wrk itself connects to the proxy's address)
--   WRK_HOST     Host header to send with it (the origin's host:port)
--   WRK_JSON     file that done() writes the summary to, as JSON
local abs = os.getenv("WRK_ABS_URL")
if abs and abs ~= "" then
  wrk.path = abs
  wrk.headers["Host"] = os.getenv("WRK_HOST")
end

function done(summary, latency, requests)
  local out = os.getenv("WRK_JSON")
  if not out or out == "" then return end
  local e = summary.errors
  local f = assert(io.open(out, "w"))
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p99_9":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
  f:close()
end
