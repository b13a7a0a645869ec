-- units: seconds (now, TATs; float), amount per second (rate), bucket units (burst, replies as %.17g strings)
-- Units left in each bucket, changing nothing. KEYS: one per bucket. ARGV[1]: now, or '' to read
-- Redis TIME (less EPOCH_S); then per bucket: rate_per_s, burst.
local EPOCH_S = 1700000000
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local reply = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  local start = now
  if tat ~= nil and tat >= now then
    start = tat
  end
  reply[i] = string.format('%.17g', burst - (start - now) * rate)
end
return reply
