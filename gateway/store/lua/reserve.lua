-- units: seconds (now, lease; float), bytes (figures, limit; integers)
-- Twin of gateway/core/shared.py LeaseBook.reserve (with beat.lua): keep the steps identical.
-- KEYS[1]: hash replica -> bytes; KEYS[2]: hash replica -> sequence number; KEYS[3]: zset
-- replica -> heartbeat expiry. ARGV[1]: now, or '' to read Redis TIME (less EPOCH_S);
-- ARGV[2]: replica; ARGV[3]: sequence number; ARGV[4]: the replica's new figure in bytes;
-- ARGV[5]: lease in seconds; ARGV[6]: key TTL in ms; ARGV[7]: limit in bytes.
-- Reply: {recorded 0|1, foreign bytes}
local EPOCH_S = 1700000000
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local replica, seq, nbytes = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, ttl_ms, limit = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.17g', now))) do
  redis.call('ZREM', KEYS[3], dead)
  redis.call('HDEL', KEYS[1], dead)
  redis.call('HDEL', KEYS[2], dead)
end
redis.call('ZADD', KEYS[3], string.format('%.17g', now + lease), replica)
local foreign = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= replica then
    foreign = foreign + tonumber(all[i + 1])
  end
end
local recorded = 0
if nbytes + foreign <= limit then
  recorded = 1
  local stored = tonumber(redis.call('HGET', KEYS[2], replica))
  if stored == nil or seq > stored then
    redis.call('HSET', KEYS[2], replica, ARGV[3])
    redis.call('HSET', KEYS[1], replica, ARGV[4])
  end
end
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl_ms)
end
return {recorded, foreign}
