-- OpenBao Transit decrypt of one fixed ciphertext (a ~40-byte API key), for reference.
-- POST /v1/transit/decrypt/<key> {"ciphertext": "vault:v1:..."}; args key=, ciphertext=.
local here = string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "./"
dofile(here .. "common.lua")

local body
function prepare(o)
  body = '{"ciphertext":"' .. o.ciphertext .. '"}'
end
function make_request(k)
  return wrk.format("POST", "/v1/transit/decrypt/" .. opts.key, {
    ["X-Vault-Token"] = opts.token,
    ["Content-Type"] = "application/json",
  }, body)
end
