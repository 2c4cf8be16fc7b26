-- wrk script: POST /jobs with a JSON body carrying a 100-byte payload, on keep-alive
-- connections. bench/run.py sets the job name and the payload through the environment
-- (BENCH_JOB_NAME, BENCH_PAYLOAD) and reads the one JSON line that done() prints.

local name = os.getenv("BENCH_JOB_NAME") or "bench_enqueue"
local payload = os.getenv("BENCH_PAYLOAD") or string.rep("x", 100)

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"name":"' .. name .. '","payload":"' .. payload .. '"}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
