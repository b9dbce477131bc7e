-- The shared ledger's clock, common to its scripts: Redis's own time in microseconds (or the
-- caller's `t`, in tests), never earlier than any time a script used before (a high-water mark
-- in KEYS[1], so it never runs backwards across a failover).
local spec = cjson.decode(ARGV[1])

local now
if spec.t then
  now = spec.t
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local hw = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < hw then now = hw else redis.call('SET', KEYS[1], now) end

local function k(i) return KEYS[i] end
local function ms(us) return math.ceil(us / 1000) end

