-- units: seconds (now, lease; float), bytes or slots (figures, limit; integers), weights (float)
-- Twin of gateway/core/shared.py LeaseBook.reserve (with beat.lua): keep the steps identical.
-- KEYS[1]: hash replica -> bytes; KEYS[2]: hash replica -> sequence number; KEYS[3]: zset
-- replica -> heartbeat expiry; KEYS[4]: hash replica -> demand (waiting tenants' weights);
-- KEYS[5]: hash replica -> the best priority band waiting there (lower is better).
-- ARGV[1]: now, or '' to read Redis TIME (less EPOCH_S); ARGV[2]: replica; ARGV[3]: sequence
-- number; ARGV[4]: the replica's new figure in bytes; ARGV[5]: lease in seconds; ARGV[6]: key
-- TTL in ms; ARGV[7]: limit in bytes; ARGV[8]: the requesting tenant's weight; ARGV[9]: the
-- request's band.
-- Reply: {recorded 0|1, bytes this replica may not plan on}
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
local weight, band = tonumber(ARGV[8]), tonumber(ARGV[9])
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.17g', now))) do
  redis.call('ZREM', KEYS[3], dead)
  redis.call('HDEL', KEYS[1], dead)
  redis.call('HDEL', KEYS[2], dead)
  redis.call('HDEL', KEYS[4], dead)
  redis.call('HDEL', KEYS[5], dead)
end
redis.call('ZADD', KEYS[3], string.format('%.17g', now + lease), replica)
local foreign = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= replica then
    foreign = foreign + tonumber(all[i + 1])
  end
end
-- LeaseBook._cap: the weighted share while a waiting replica holds less than its own
local cap = limit
local wants = redis.call('HGETALL', KEYS[4])
local mine = 0.0
local others = {}
for i = 1, #wants, 2 do
  local w = tonumber(wants[i + 1])
  if wants[i] == replica then
    mine = w
  elseif w > 0 and (tonumber(redis.call('HGET', KEYS[5], wants[i])) or band) <= band then
    others[#others + 1] = {wants[i], w}
  end
end
if #others > 0 then
  if weight > mine then
    mine = weight
  end
  local total = mine
  for _, o in ipairs(others) do
    total = total + o[2]
  end
  for _, o in ipairs(others) do
    if (tonumber(redis.call('HGET', KEYS[1], o[1])) or 0) < limit * o[2] / total then
      cap = limit * mine / total
      break
    end
  end
end
-- nothing while another replica waits with a better band
local bands = redis.call('HGETALL', KEYS[5])
for i = 1, #bands, 2 do
  if bands[i] ~= replica and tonumber(bands[i + 1]) < band
      and (tonumber(redis.call('HGET', KEYS[4], bands[i])) or 0) > 0 then
    cap = 0
    break
  end
end
local blocked = math.max(foreign, limit - cap)
local recorded = 0
if nbytes + blocked <= limit then
  recorded = 1
  local stored = tonumber(redis.call('HGET', KEYS[2], replica))
  if stored == nil or seq > stored then
    redis.call('HSET', KEYS[2], replica, ARGV[3])
    redis.call('HSET', KEYS[1], replica, ARGV[4])
  end
end
for i = 1, 5 do
  redis.call('PEXPIRE', KEYS[i], ttl_ms)
end
return {recorded, blocked}
