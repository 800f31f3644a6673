-- OpenBao KV v2 write on a per-user path (a new version each time).
-- POST /v1/secret/data/users/bench-user-<i>/bench.key-<j> {"data":{"value":"<api key>"}}.
local here = string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "./"
dofile(here .. "common.lua")

function make_request(k)
  local u, j = user_and_name(k)
  return wrk.format("POST", "/v1/secret/data/users/bench-user-" .. u .. "/bench.key-" .. j, {
    ["X-Vault-Token"] = opts.token,
    ["Content-Type"] = "application/json",
  }, '{"data":{"value":"' .. api_key() .. '"}}')
end
