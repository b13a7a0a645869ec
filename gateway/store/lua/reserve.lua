-- units: seconds (now, lease; float), bytes or slots (figures, limit; integers), weights (float)
-- Twin of gateway/core/shared.py LeaseBook.reserve (with beat.lua): keep the steps identical.
-- KEYS[1]: hash replica -> bytes; KEYS[2]: hash replica -> sequence number; KEYS[3]: zset
-- replica -> heartbeat expiry; KEYS[4]: hash replica -> demand (waiting tenants' weights);
-- KEYS[5]: hash replica -> the best priority band waiting there (lower is better).
-- ARGV[1]: now, or '' to read Redis TIME (less EPOCH_S); ARGV[2]: replica; ARGV[3]: sequence
-- number; ARGV[4]: the replica's new figure in bytes; ARGV[5]: lease in seconds; ARGV[6]: key
-- TTL in ms; ARGV[7]: limit in bytes; ARGV[8]: the requesting tenant's weight; ARGV[9]: the
-- request's band.
-- Reply: {recorded 0|1, bytes this replica may not plan on}. lease.lua comes first.
local now = lease_now(ARGV[1])
local replica, seq, nbytes = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, ttl_ms, limit = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local weight, band = tonumber(ARGV[8]), tonumber(ARGV[9])
lease_renew(replica, now, lease)
local foreign = lease_foreign(replica)
local cap = lease_cap(replica, limit, weight, band)
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
lease_expire(ttl_ms)
return {recorded, blocked}
