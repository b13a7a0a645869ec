-- units: seconds (now, lease; float), bytes or slots (figures, limit; integers), weights (float)
-- Twin of gateway/core/shared.py LeaseBook.beat (with reserve.lua): keep the steps identical.
-- KEYS and ARGV[1..6] as in reserve.lua; ARGV[7]: the replica's demand (the weights of the
-- tenants waiting in its queue for this backend); ARGV[8]: limit in bytes (0: unknown, no
-- fairness); ARGV[9]: the best band waiting there, or '' (none). Reply: the bytes this replica
-- may not plan on. lease.lua comes first.
local now = lease_now(ARGV[1])
local replica, seq = ARGV[2], tonumber(ARGV[3])
local lease, ttl_ms, limit = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[8])
lease_renew(replica, now, lease)
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
local foreign = lease_foreign(replica)
lease_expire(ttl_ms)
if limit <= 0 then
  return foreign
end
-- for a tenant of weight 1 in the best band waiting here (none: any band)
local band = math.huge
if ARGV[9] ~= '' then
  band = tonumber(ARGV[9])
end
return math.max(foreign, limit - lease_cap(replica, limit, 1.0, band))
