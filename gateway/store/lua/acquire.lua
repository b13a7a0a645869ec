-- units: seconds (now, TATs, waits; float), amount per second (rate), bucket units (burst, amount); replies are %.17g strings
-- Twin of gateway/core/bucket.py try_take, turn_of and places_of: keep the formulas and their
-- order identical.
-- KEYS: one TAT key per bucket, then one turn key per bucket, then one line key per bucket, in the
-- same order (turn and line are read and written only for buckets that wait: the last turn given,
-- so a later take goes no earlier; and where the next refused take's place in the line of retries
-- begins, so refused takes are told apart).
-- ARGV[1]: now, or '' to read Redis TIME (less EPOCH_S);
-- ARGV[2]: least TTL in ms; ARGV[3]: max_wait_s; then per bucket: rate_per_s, burst, amount,
-- waits (1: a take may wait for this bucket up to max_wait_s, 0: it may not).
-- Reply: {allowed 0|1, never 0|1, blocking (1-based, 0 none), retry_after_s, remaining..., reset_s...,
-- wait_s}
local EPSILON_S = 1e-6
local LINE_HORIZON_S = 60.0
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
local max_wait_s = tonumber(ARGV[3])
local count = #KEYS / 3
local rates, bursts, amounts, starts, news, waiting = {}, {}, {}, {}, {}, {}
local allowed, never, blocking, worst, waited = true, false, 0, 0.0, 0.0
for i = 1, count do
  local rate = tonumber(ARGV[4 * i])
  local burst = tonumber(ARGV[4 * i + 1])
  local amount = tonumber(ARGV[4 * i + 2])
  local waits = ARGV[4 * i + 3] == '1'
  local tat = tonumber(redis.call('GET', KEYS[i]))
  local start = now
  if tat ~= nil and tat >= now then
    start = tat
  end
  local new = start + amount / rate
  rates[i], bursts[i], amounts[i], starts[i], news[i], waiting[i] = rate, burst, amount, start, new, waits
  if amount > 0 then
    if amount > burst then
      allowed = false
      if not never then
        never = true
        blocking = i
      end
    else
      local wait = (new - now) - burst / rate
      local late = wait
      local granted = false
      if waits then
        local begins = wait - amount / rate
        local turn = tonumber(redis.call('GET', KEYS[count + i]))
        if turn ~= nil and turn - now > begins then
          begins = turn - now
          if begins > wait then
            wait = begins
          end
        end
        late = begins - max_wait_s
        if late <= EPSILON_S then
          if wait > waited then
            waited = wait
          end
          granted = true
        end
      end
      if not granted and wait > EPSILON_S then
        allowed = false
        if not never and late > worst then
          worst = late
          blocking = i
        end
      end
    end
  end
end
if not allowed and not never then
  -- its place in the line of retries, after the places of the takes refused before it
  for i = 1, count do
    if waiting[i] and amounts[i] > 0 then
      local line = tonumber(redis.call('GET', KEYS[2 * count + i]))
      if line ~= nil and line - now > worst then
        worst = line - now
        blocking = i
      end
    end
  end
  if worst <= LINE_HORIZON_S then
    local back = now + worst
    for i = 1, count do
      if waiting[i] and amounts[i] > 0 then
        local place = back + amounts[i] / rates[i]
        local ttl_ms = math.min(math.max(math.ceil((place - now) * 1000) + 1, min_ttl_ms), MAX_TTL_MS)
        redis.call('SET', KEYS[2 * count + i], string.format('%.17g', place), 'PX', string.format('%d', ttl_ms))
      end
    end
  end
end
local ends = starts
if allowed then
  ends = news
  for i = 1, count do
    if amounts[i] > 0 then
      local ttl_ms = math.min(math.max(math.ceil((news[i] - now) * 1000) + 1, min_ttl_ms), MAX_TTL_MS)
      redis.call('SET', KEYS[i], string.format('%.17g', news[i]), 'PX', string.format('%d', ttl_ms))
    end
  end
  if waited > 0 then
    local turn = now + waited
    local ttl_ms = math.min(math.max(math.ceil(waited * 1000) + 1, min_ttl_ms), MAX_TTL_MS)
    for i = 1, count do
      if waiting[i] and amounts[i] > 0 then
        redis.call('SET', KEYS[count + i], string.format('%.17g', turn), 'PX', string.format('%d', ttl_ms))
      end
    end
  end
end
local reply = {allowed and 1 or 0, never and 1 or 0, blocking, string.format('%.17g', worst)}
for i = 1, count do
  reply[4 + i] = string.format('%.17g', bursts[i] - (ends[i] - now) * rates[i])
  reply[4 + count + i] = string.format('%.17g', ends[i] - now)
end
if not allowed then
  waited = 0.0
end
reply[5 + 2 * count] = string.format('%.17g', waited)
return reply
