-- One decision of the shared ledger, all or nothing, in one call (see shared_ledger/redis.rs).
-- KEYS[1] the clock's high-water mark, KEYS[2] the epoch, KEYS[3] replicas by last contact;
-- every other key is named by its index in the spec (ARGV[1], JSON). Times are microseconds
-- of Redis's clock, which never runs backwards here (the high-water mark survives a failover).
--
-- Replies: {1, now, alive, silent, mark..., count...} granted (a mark per quota, 0 unless synced;
-- the count each window holds after the charge); {0, now, alive, silent, retry_at, binding,
-- count...} refused; {2, now, alive, silent, count..., replica...} for a look without a charge
-- (with the replicas alive); {-1, now,
-- epoch} when the ledger's epoch is not the caller's (state lost, or re-seeded: sync first);
-- {-2, now} when no candidate fixed window contains now (the caller's clock is far off).

-- (clock.lua, prepended, sets `spec`, `now`, `k` and `ms`.)

local epoch = redis.call('GET', KEYS[2])
if (not epoch) or epoch ~= spec.e then
  return {-1, now, epoch or ''}
end

-- This replica is alive; replicas silent for a while may be deciding on their own.
redis.call('ZADD', KEYS[3], now, spec.r)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - spec.fgt)
local alive = redis.call('ZCOUNT', KEYS[3], now - spec.sil, '+inf')
local silent = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. (now - spec.sil))


-- Windows --------------------------------------------------------------------------------

local function fixed_window(fw)
  for _, w in ipairs(fw) do
    if w[1] <= now and now < w[2] then return w end
  end
  return nil
end

local function buckets_prune(w, span)
  local cutoff = math.floor((now - span) / w.bw) - 1
  local old = redis.call('ZRANGEBYSCORE', k(w.bidx), '-inf', cutoff)
  if #old > 0 then
    local counts = redis.call('HMGET', k(w.log), unpack(old))
    local sum = 0
    for _, c in ipairs(counts) do sum = sum + tonumber(c or '0') end
    redis.call('HDEL', k(w.log), unpack(old))
    redis.call('ZREM', k(w.bidx), unpack(old))
    redis.call('DECRBY', k(w.btot), sum)
  end
  return tonumber(redis.call('GET', k(w.btot)) or '0')
end

-- The count a window holds now, and (at `thr` or more) when it drops below `thr`; `false` for
-- an unknown fixed window.
local function window_state(q, w, thr)
  if q.kind == 's' then
    redis.call('ZREMRANGEBYSCORE', k(w.log), '-inf', now - q.span)
    local n = redis.call('ZCARD', k(w.log))
    if n < thr then return n, nil end
    local at = redis.call('ZRANGE', k(w.log), n - thr, n - thr, 'WITHSCORES')
    return n, tonumber(at[2]) + q.span
  elseif q.kind == 'f' then
    local fw = fixed_window(w.fw)
    if not fw then return false end
    local n = tonumber(redis.call('GET', k(fw[3])) or '0')
    if now >= fw[2] - q.mar or n >= thr then return n, fw[2] end
    return n, nil
  else
    local n = buckets_prune(w, q.span)
    if n < thr then return n, nil end
    local must_drop = n - thr + 1
    local ids = redis.call('ZRANGE', k(w.bidx), 0, -1)
    local counts = redis.call('HMGET', k(w.log), unpack(ids))
    local dropped = 0
    for i, b in ipairs(ids) do
      dropped = dropped + tonumber(counts[i] or '0')
      if dropped >= must_drop then return n, (tonumber(b) + 1) * w.bw + q.span end
    end
    return n, nil
  end
end

local function charge_window(q, w, member, count)
  if q.kind == 's' then
    for c = 1, count do
      redis.call('ZADD', k(w.log), now, member .. (c > 1 and (':' .. c) or ''))
    end
    redis.call('PEXPIRE', k(w.log), ms(q.span) + 1000)
  elseif q.kind == 'f' then
    local fw = fixed_window(w.fw)
    redis.call('INCRBY', k(fw[3]), count)
    redis.call('PEXPIREAT', k(fw[3]), ms(fw[2]) + 1000)
  else
    local b = math.floor(now / w.bw)
    redis.call('HINCRBY', k(w.log), b, count)
    redis.call('ZADD', k(w.bidx), b, b)
    redis.call('INCRBY', k(w.btot), count)
    for _, key in ipairs({w.log, w.bidx, w.btot}) do
      redis.call('PEXPIRE', k(key), ms(q.span + w.bw) + 1000)
    end
  end
end

-- CRM ceilings --------------------------------------------------------------------------

local function careful_below(limit)
  return math.max(math.floor(limit / 10), 2)
end

local function outstanding(q)
  redis.call('ZREMRANGEBYSCORE', k(q.out), '-inf', now)
  return redis.call('ZCARD', k(q.out))
end

-- The ceiling the CRM's answers impose, rolled on to the CRM's next window when it named one.
local function cap_of(q, grants, out)
  local h = redis.call('HMGET', k(q.cap), 'c', 'u', 'm', 'p', 'f', 'L')
  if not h[1] then return nil end
  local cap = {c = tonumber(h[1]), u = tonumber(h[2]), m = tonumber(h[3]), p = tonumber(h[4]),
               f = tonumber(h[5]), L = tonumber(h[6] or '')}
  if cap.p > 0 and now >= cap.u and cap.L then
    local behind = math.floor((now - cap.u) / cap.p)
    cap.u = cap.u + cap.p * (behind + 1)
    cap.c = grants + math.max(0, cap.L - q.res - out)
    cap.m = grants
    cap.f = 0
    redis.call('HSET', k(q.cap), 'c', cap.c, 'u', cap.u, 'm', cap.m, 'f', 0)
    redis.call('PEXPIREAT', k(q.cap), ms(cap.u + q.win) + 1000)
  end
  return cap
end

-- Updates queued by the caller since its last call -----------------------------------------

for _, r in ipairs(spec.u.rel) do redis.call('ZREM', k(r[1]), r[2]) end

for _, key in ipairs(spec.u.lift) do redis.call('DEL', k(key)) end

for _, f in ipairs(spec.u.frz) do
  local cur = tonumber(redis.call('GET', k(f[1])) or '0')
  if f[2] > cur then
    redis.call('SET', k(f[1]), f[2])
    redis.call('PEXPIREAT', k(f[1]), ms(f[2]) + 1000)
  end
end

for _, o in ipairs(spec.u.obs) do
  if o.cost and o.cost > 1 then
    charge_window(o.q, o.q.w, spec.g .. ':cost:' .. o.mark, o.cost - 1)
    redis.call('INCRBY', k(o.q.cnt), o.cost - 1)
  end
  if o.lim then redis.call('HSET', k(o.q.cap), 'L', o.lim) end
  if o.rem then
    redis.call('HSET', k(o.q.cap), 'R', o.rem)
    local new = {c = o.mark + math.max(0, o.rem - o.q.res), u = o.reset or o.hold, m = o.mark,
                 p = o.reset and o.q.win or 0, f = 1}
    local h = redis.call('HMGET', k(o.q.cap), 'c', 'u', 'm', 'p')
    local old = h[1] and {u = tonumber(h[2]), m = tonumber(h[3]), p = tonumber(h[4])} or nil
    if old and old.p > 0 and new.p > 0 and o.q.win >= 10000000 and math.abs(old.u - new.u) < 1000000 then
      new.u = math.min(old.u, new.u)
    end
    if not (old and now < old.u and old.m > o.mark) then
      redis.call('HSET', k(o.q.cap), 'c', new.c, 'u', new.u, 'm', new.m, 'p', new.p, 'f', new.f)
    end
  end
  redis.call('PEXPIRE', k(o.q.cap), ms(o.q.win * 2) + 60000)
end

-- The decision ---------------------------------------------------------------------------

local counts = {}
local marks = {}
local blocked, binding = nil, nil
local function block(at, i)
  if not blocked or at > blocked then blocked, binding = at, i end
end

local plans = {}
for i, q in ipairs(spec.q) do
  local plan = {w = q.w}
  local frozen = tonumber(redis.call('GET', k(q.frz)) or '0')
  if now < frozen then
    block(frozen, i)
  elseif q.key then
    local tr = k(q.key.tr)
    redis.call('ZREMRANGEBYSCORE', tr, '-inf', now)
    if redis.call('ZSCORE', tr, q.key.m) then
      plan.w = q.key.own
    elseif redis.call('ZCARD', tr) >= q.key.max then
      plan.w, plan.overflow = q.key.ovf, true
    else
      plan.w = q.key.own
    end
    local n, at = window_state(q, plan.w, q.lim)
    if n == false then return {-2, now} end
    counts[i] = n
    if at then block(at, i) end
  else
    -- Replicas silent for a while may be spending their fallback share: leave it to them.
    local thr = q.lim - silent * math.floor(q.lim / spec.n)
    if thr < 1 then thr = 1 end
    local n, at = window_state(q, q.w, thr)
    if n == false then return {-2, now} end
    counts[i] = n
    if at then block(at, i) end
    -- A parked write on a scheduled quota: only what the schedule released so far (each call
    -- as its share of the release begins); the binding is negative so the caller does not hold
    -- live requests with it.
    local fw = q.sch and fixed_window(q.w.fw)
    for _, s in ipairs(q.sch or {}) do
      if fw and s[1] == fw[1] then
        local a, rs, re, lim = s[2], s[3], s[4], s[5]
        local allowed = lim
        if now <= rs then
          allowed = a
        elseif now < re then
          allowed = a + math.ceil((lim - a) * (now - rs) / (re - rs))
        end
        if n >= allowed then
          local until_at = s[6]
          if n < lim then until_at = rs + math.floor((n - a) * (re - rs) / (lim - a)) + 1 end
          if not blocked or until_at > blocked then blocked, binding = until_at, -i end
        end
      end
    end
    if q.cap then
      local grants = tonumber(redis.call('GET', k(q.cnt)) or '0')
      local out = outstanding(q)
      local cap = cap_of(q, grants, out)
      if cap and now < cap.u then
        local left = cap.c - grants
        if left <= 0 then
          block(cap.u, i)
        elseif out > 0 and (cap.f == 0 or left < careful_below(cap.L or q.lim)) then
          block(now + 1000000, i)
        end
      end
    end
  end
  plans[i] = plan
end

if not spec.charge then
  local reply = {2, now, alive, silent}
  for i = 1, #spec.q do reply[#reply + 1] = counts[i] or 0 end
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], now - spec.sil, '+inf')) do
    reply[#reply + 1] = r
  end
  return reply
end

if blocked then
  local reply = {0, now, alive, silent, blocked, binding}
  for i = 1, #spec.q do reply[#reply + 1] = counts[i] or 0 end
  return reply
end

for i, q in ipairs(spec.q) do
  local member = spec.g .. ':' .. i
  charge_window(q, plans[i].w, member, 1)
  counts[i] = (counts[i] or 0) + 1
  if q.key and not plans[i].overflow then
    redis.call('ZADD', k(q.key.tr), now + q.span, q.key.m)
    redis.call('PEXPIRE', k(q.key.tr), ms(q.span) + 1000)
  end
  marks[i] = 0
  if q.cap then
    marks[i] = redis.call('INCR', k(q.cnt))
    redis.call('ZADD', k(q.out), now + spec.ot, member)
    redis.call('PEXPIRE', k(q.out), ms(spec.ot) + 1000)
  end
end

local reply = {1, now, alive, silent}
for i = 1, #spec.q do reply[#reply + 1] = marks[i] end
for i = 1, #spec.q do reply[#reply + 1] = counts[i] end
return reply
