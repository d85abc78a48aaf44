-- wrk script for `make bench`: posts pre-signed, distinct events to /events/action, one per request.
-- Each thread reads its own file of "id<TAB>timestamp<TAB>signature<TAB>body" lines, and writes the ids of the
-- events the relay acknowledged (200) so the benchmark can check every one of them reached PostgreSQL.

local threads = {}
local next_thread_id = 0

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
  table.insert(threads, thread)
end

function init(args)
  local prefix = args[1]
  events = io.open(prefix .. "." .. thread_id .. ".events", "r")
  acknowledged = io.open(prefix .. "." .. thread_id .. ".acked", "w")
  acknowledged:setvbuf("line")  -- wrk never closes thread files: flush as we go
  pending = {}
  exhausted = 0
  refused = 0
end

function request()
  local line = events:read("*l")
  if not line then
    -- Out of distinct events: start over (duplicates), and say so in the summary.
    exhausted = exhausted + 1
    events:seek("set", 0)
    line = events:read("*l")
  end
  local id, timestamp, signature, body = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)\t(.*)$")
  table.insert(pending, id)
  return wrk.format("POST", "/events/action", {
    ["content-type"] = "application/json",
    ["webhook-id"] = id,
    ["webhook-timestamp"] = timestamp,
    ["webhook-signature"] = signature,
  }, body)
end

function response(status, headers, body)
  -- One connection answers its requests in order, but threads share no state: match by id in the body.
  local id = body:match('"id":"([^"]+)"')
  if status == 200 and id then
    acknowledged:write(id, "\n")
  else
    refused = refused + 1
  end
end

function done(summary, latency, requests)
  local exhausted_total, refused_total = 0, 0
  for _, thread in ipairs(threads) do
    exhausted_total = exhausted_total + (thread:get("exhausted") or 0)
    refused_total = refused_total + (thread:get("refused") or 0)
  end
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"refused": %d, "socket_errors": %d, "wrapped": %d}\n',
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    refused_total, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    exhausted_total))
end
