-- units: seconds (now, lease; float), bytes or slots (figures, limit; integers), weights (float)
-- Twin of gateway/core/shared.py LeaseBook.beat (with reserve.lua): keep the steps identical.
-- KEYS and ARGV[1..6] as in reserve.lua; ARGV[7]: the replica's demand (the weights of the
-- tenants waiting in its queue for this backend); ARGV[8]: limit in bytes (0: unknown, no
-- fairness); ARGV[9]: the best band waiting there, or '' (none). Reply: the bytes this replica
-- may not plan on.
local EPOCH_S = 1700000000
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local replica, seq = ARGV[2], tonumber(ARGV[3])
local lease, ttl_ms, limit = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[8])
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.17g', now))) do
  redis.call('ZREM', KEYS[3], dead)
  redis.call('HDEL', KEYS[1], dead)
  redis.call('HDEL', KEYS[2], dead)
  redis.call('HDEL', KEYS[4], dead)
  redis.call('HDEL', KEYS[5], dead)
end
redis.call('ZADD', KEYS[3], string.format('%.17g', now + lease), replica)
local stored = tonumber(redis.call('HGET', KEYS[2], replica))
if stored == nil or seq > stored then
  redis.call('HSET', KEYS[2], replica, ARGV[3])
  redis.call('HSET', KEYS[1], replica, ARGV[4])
  redis.call('HSET', KEYS[4], replica, ARGV[7])
  if tonumber(ARGV[7]) > 0 and ARGV[9] ~= '' then
    redis.call('HSET', KEYS[5], replica, ARGV[9])
  else
    redis.call('HDEL', KEYS[5], replica)
  end
end
local foreign = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= replica then
    foreign = foreign + tonumber(all[i + 1])
  end
end
for i = 1, 5 do
  redis.call('PEXPIRE', KEYS[i], ttl_ms)
end
if limit <= 0 then
  return foreign
end
-- LeaseBook._cap, for a tenant of weight 1 in the best band waiting here (none: any band)
local band = math.huge
if ARGV[9] ~= '' then
  band = tonumber(ARGV[9])
end
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
  if 1.0 > mine then
    mine = 1.0
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
return math.max(foreign, limit - cap)
