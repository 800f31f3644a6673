-- nginx: GET of a static ~100-byte JSON file, the floor for any HTTPS response.
local here = string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "./"
dofile(here .. "common.lua")

function make_request(k)
  return wrk.format("GET", "/static.json")
end
