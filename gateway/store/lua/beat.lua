-- units: seconds (now, lease; float), bytes (figures; integers)
-- Twin of gateway/core/shared.py LeaseBook.beat (with reserve.lua): keep the steps identical.
-- KEYS and ARGV[1..6] as in reserve.lua. Reply: foreign bytes.
local EPOCH_S = 1700000000
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local replica, seq = ARGV[2], tonumber(ARGV[3])
local lease, ttl_ms = tonumber(ARGV[5]), ARGV[6]
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.17g', now))) do
  redis.call('ZREM', KEYS[3], dead)
  redis.call('HDEL', KEYS[1], dead)
  redis.call('HDEL', KEYS[2], dead)
end
redis.call('ZADD', KEYS[3], string.format('%.17g', now + lease), replica)
local stored = tonumber(redis.call('HGET', KEYS[2], replica))
if stored == nil or seq > stored then
  redis.call('HSET', KEYS[2], replica, ARGV[3])
  redis.call('HSET', KEYS[1], replica, ARGV[4])
end
local foreign = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= replica then
    foreign = foreign + tonumber(all[i + 1])
  end
end
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl_ms)
end
return foreign
