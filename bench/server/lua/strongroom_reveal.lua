-- Strongroom: the service reveals a stored credential of user i.
-- POST /v1/owners/bench-user-<i>/credentials/bench.key-<j>/reveal {} with the service token.
local here = string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "./"
dofile(here .. "common.lua")

function make_request(k)
  local u, j = user_and_name(k)
  return wrk.format("POST", "/v1/owners/bench-user-" .. u .. "/credentials/bench.key-" .. j .. "/reveal", {
    ["Authorization"] = "Bearer " .. opts.token,
    ["Content-Type"] = "application/json",
  }, "{}")
end
