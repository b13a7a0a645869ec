-- The steps reserve.lua and beat.lua share, prepended to each when it is registered (Redis
-- scripts cannot import). KEYS as documented in reserve.lua.
local EPOCH_S = 1700000000

-- ARGV[1] as the time, or Redis TIME (less EPOCH_S) when it is ''
local function lease_now(given)
  if given ~= '' then
    return tonumber(given)
  end
  local t = redis.call('TIME')
  return (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
end

-- drop every replica whose heartbeat expired, then renew this one's
local function lease_renew(replica, now, lease)
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.17g', now))) do
    redis.call('ZREM', KEYS[3], dead)
    for i = 1, 5 do
      if i ~= 3 then
        redis.call('HDEL', KEYS[i], dead)
      end
    end
  end
  redis.call('ZADD', KEYS[3], string.format('%.17g', now + lease), replica)
end

-- the other replicas' figures, summed
local function lease_foreign(replica)
  local foreign = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i] ~= replica then
      foreign = foreign + tonumber(all[i + 1])
    end
  end
  return foreign
end

-- LeaseBook._cap: the weighted share (this replica's demand, at least ``weight``) while a
-- replica waiting in ``band`` or better holds less than its own; else the whole ``limit``
local function lease_cap(replica, limit, weight, band)
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
  if #others == 0 then
    return limit
  end
  if weight > mine then
    mine = weight
  end
  local total = mine
  for _, o in ipairs(others) do
    total = total + o[2]
  end
  for _, o in ipairs(others) do
    if (tonumber(redis.call('HGET', KEYS[1], o[1])) or 0) < limit * o[2] / total then
      return limit * mine / total
    end
  end
  return limit
end

local function lease_expire(ttl_ms)
  for i = 1, 5 do
    redis.call('PEXPIRE', KEYS[i], ttl_ms)
  end
end
