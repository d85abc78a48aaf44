-- wrk script for `make bench`: posts distinct ~800-byte `user.created` events to /events/webhook with a bearer
-- token, one per request, the way Auth0's webhook destination sends them. Every thread numbers its own events,
-- so no two requests of a run carry the same event or user. The ids of the events answered 200 are written
-- to one file per thread, so the benchmark can check every one of them reached PostgreSQL.
--
-- Arguments (after `--`): run tag, bearer token, prefix of the files for acknowledged ids ("-" for none).

local threads = {}

function setup(thread)
  thread:set("thread_number", #threads)
  table.insert(threads, thread)
end

function init(args)
  tag = args[1] .. "t" .. thread_number
  token = args[2]
  if args[3] ~= "-" then
    acknowledged = io.open(args[3] .. "." .. thread_number .. ".acked", "w")
    acknowledged:setvbuf("line")  -- wrk never closes thread files: flush as we go
  end
  sent = 0
  refused = 0
  stamp = os.date("!%Y-%m-%dT%H:%M:%S.000Z")
end

function request()
  sent = sent + 1
  local number = string.format("%s%010d", tag, sent)
  local body = '{"specversion":"1.0","type":"user.created","source":"urn:auth0:bench.us.auth0.com",' ..
    '"id":"evt_' .. number .. '","time":"' .. stamp .. '","data":{"object":{' ..
    '"user_id":"auth0|' .. number .. '","email":"user' .. number .. '@example.com","email_verified":false,' ..
    '"name":"Bench User ' .. number .. '","nickname":"user' .. number .. '",' ..
    '"picture":"https://s.gravatar.com/avatar/0?s=480&r=pg&d=https%3A%2F%2Fcdn.auth0.com%2Favatars%2Fbu.png",' ..
    '"identities":[{"connection":"Username-Password-Authentication","provider":"auth0","isSocial":false,' ..
    '"user_id":"' .. number .. '"}],"app_metadata":{"plan":"free","seats":1},' ..
    '"user_metadata":{"locale":"en","newsletter":false},"created_at":"' .. stamp .. '","updated_at":"' ..
    stamp .. '","last_login":"' .. stamp .. '","logins_count":1,"blocked":false}},' ..
    '"a0tenant":"bench","a0stream":"est_0000000000000000000000"}'
  return wrk.format("POST", "/events/webhook", {
    ["content-type"] = "application/json",
    ["authorization"] = "Bearer " .. token,
  }, body)
end

function response(status, headers, body)
  if status == 200 or status == 204 then
    if acknowledged then
      -- One connection answers its requests in order, but threads share no state: match by id in the body.
      local id = body:match('"id":"([^"]+)"')
      if id then
        acknowledged:write(id, "\n")
      end
    end
  else
    refused = refused + 1
  end
end

function done(summary, latency, requests)
  local refused_total = 0
  for _, thread in ipairs(threads) do
    refused_total = refused_total + (thread:get("refused") or 0)
  end
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"refused": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    refused_total, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
