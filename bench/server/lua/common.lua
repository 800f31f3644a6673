-- Shared wrk plumbing for the server benchmark (loaded by every operation script).
--
-- Each operation script sets `make_request(k)` (k = a run-wide unique request index, so
-- threads never send the same (user, name) at the same moment) and may set `prepare(opts)`.
-- Script arguments (after `--` on the wrk command line) are key=value pairs:
--   expect=STATUS   the only status counted as success (anything else is an error)
--   threads=T       wrk's -t, so request indices interleave across threads
--   tokens=FILE     one bearer token per line (user JWTs), users = number of lines
--   token=VALUE     one token for every request (service token, OpenBao token)
--   users=N names=M the (user, name) space requests walk through
-- done() prints one machine-readable line that bench/server/run parses:
--   BENCH requests=.. duration_us=.. rps=.. p50_us=.. p99_us=.. errors=.. bad_status=.. socket_errors=..
-- (errors = responses with another status than expect= plus socket errors and timeouts;
-- bad_status lists them as STATUSxCOUNT joined by +, or -).

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

opts = {}
-- Globals (not locals) so that done() can read them back with thread:get().
bad = 0
bad_statuses = ""
local bad_by_status = {}
local counter = 0
local nthreads = 1

function init(args)
  for _, a in ipairs(args) do
    local key, value = string.match(a, "^([%w_]+)=(.*)$")
    if key then opts[key] = value end
  end
  id = tonumber(id) or 0 -- set by setup() in the main state before init() runs
  nthreads = tonumber(opts.threads or "1")
  opts.expect = tonumber(opts.expect or "200")
  opts.users = tonumber(opts.users or "1")
  opts.names = tonumber(opts.names or "1")
  if opts.tokens then
    opts.token_list = {}
    for line in io.lines(opts.tokens) do
      if #line > 0 then table.insert(opts.token_list, line) end
    end
    opts.users = #opts.token_list
  end
  math.randomseed(1000 + id)
  if prepare then prepare(opts) end
end

-- A ~40-character API-key-like value; random per request, same shape for every target.
local hex = "0123456789abcdef"
function api_key()
  local t = {}
  for i = 1, 32 do
    local r = math.random(1, 16)
    t[i] = string.sub(hex, r, r)
  end
  return "sk_live_" .. table.concat(t)
end

-- The (user index, name index) that request k addresses: users first, then names.
function user_and_name(k)
  return k % opts.users, math.floor(k / opts.users) % opts.names
end

function request()
  local k = counter * nthreads + id
  counter = counter + 1
  return make_request(k)
end

function response(status, headers, body)
  if status ~= opts.expect then
    bad = bad + 1
    bad_by_status[status] = (bad_by_status[status] or 0) + 1
    local parts = {}
    for s, n in pairs(bad_by_status) do table.insert(parts, s .. "x" .. n) end
    bad_statuses = table.concat(parts, "+")
  end
end

function done(summary, latency, requests)
  local errors = 0
  local by_status = {}
  for _, t in ipairs(threads) do
    errors = errors + (tonumber(t:get("bad")) or 0)
    for s, n in string.gmatch(t:get("bad_statuses") or "", "(%d+)x(%d+)") do
      by_status[s] = (by_status[s] or 0) + tonumber(n)
    end
  end
  local statuses = {}
  for s, n in pairs(by_status) do table.insert(statuses, s .. "x" .. n) end
  table.sort(statuses)
  local e = summary.errors
  local socket_errors = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d errors=%d bad_status=%s socket_errors=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), errors + socket_errors,
    (#statuses > 0) and table.concat(statuses, "+") or "-", socket_errors))
end
