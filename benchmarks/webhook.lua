-- wrk script for POST /webhooks/github: a signed merged-pull-request delivery.
-- PB_BODY: the payload file; PB_SIG: its X-Hub-Signature-256; PB_DELIVERY: "unique" (every
-- request a new delivery id: verified, recorded, its job de-duplicated) or a fixed id (every
-- request after the first is a redelivery).
local body = io.open(os.getenv("PB_BODY"), "rb"):read("*a")
local sig = os.getenv("PB_SIG")
local mode = os.getenv("PB_DELIVERY") or "unique"
local counter = 1

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local n = 0
function request()
  n = n + 1
  local delivery = mode
  if mode == "unique" then
    delivery = string.format("bench-%d-%d-%d", tid or 0, n, math.random(1e9))
  end
  return wrk.format("POST", "/webhooks/github", {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "pull_request",
    ["X-GitHub-Delivery"] = delivery,
    ["X-Hub-Signature-256"] = sig,
  }, body)
end

local codes = {}
function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end
