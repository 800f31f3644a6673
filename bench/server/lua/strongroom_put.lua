-- Strongroom: a user stores a new version of one of their credentials.
-- PUT /v1/me/credentials/bench.key-<j> {"value": "<api key>"} with user i's JWT; expect=201.
local here = string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "./"
dofile(here .. "common.lua")

function make_request(k)
  local u, j = user_and_name(k)
  return wrk.format("PUT", "/v1/me/credentials/bench.key-" .. j, {
    ["Authorization"] = "Bearer " .. opts.token_list[u + 1],
    ["Content-Type"] = "application/json",
  }, '{"value":"' .. api_key() .. '"}')
end
