-- units: seconds (now, TATs; float), amount per second (rate), bucket units (delta: > 0 overrun, < 0 refund)
-- Twin of gateway/core/bucket.py adjust: keep the formulas and their order identical.
-- KEYS: one per bucket. ARGV[1]: now, or '' to read Redis TIME (less EPOCH_S);
-- ARGV[2]: least TTL in ms; then per bucket: rate_per_s, delta. A bucket that ends full is deleted.
local EPOCH_S = 1700000000
local MAX_TTL_MS = 1e15 -- PX takes an integer; a longer debt is not worth keeping exactly
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local min_ttl_ms = tonumber(ARGV[2])
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i + 1])
  local delta = tonumber(ARGV[2 * i + 2])
  if delta ~= 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    local start = now
    if tat ~= nil and tat >= now then
      start = tat
    end
    local new = start + delta / rate
    if new < now then
      new = now
    end
    if new > now then
      local ttl_ms = math.min(math.max(math.ceil((new - now) * 1000) + 1, min_ttl_ms), MAX_TTL_MS)
      redis.call('SET', KEYS[i], string.format('%.17g', new), 'PX', string.format('%d', ttl_ms))
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 0
