-- OpenBao KV v2 read of a stored per-user secret.
-- GET /v1/secret/data/users/bench-user-<i>/bench.key-<j>.
local here = string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "./"
dofile(here .. "common.lua")

function make_request(k)
  local u, j = user_and_name(k)
  return wrk.format("GET", "/v1/secret/data/users/bench-user-" .. u .. "/bench.key-" .. j, {
    ["X-Vault-Token"] = opts.token,
  })
end
