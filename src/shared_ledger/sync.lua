-- A replica (re)joins the shared ledger (see shared_ledger/redis.rs): it adds the grants Redis
-- does not know of (all of its own in open windows when the ledger lost its state, else those
-- it made on its own while Redis was unreachable) and marks itself synced in the epoch.
-- KEYS[1] clock, KEYS[2] epoch, KEYS[3] replicas, KEYS[4] epoch each replica last synced in;
-- the spec's windows name the other keys by index.
--
-- Reply: {created, now, epoch, synced replica...} (the replicas synced in this epoch);
-- {-1, now, epoch} when the caller pushed only its fallback grants but the ledger's epoch is not
-- its own (it must push everything).

-- (clock.lua, prepended, sets `spec`, `now`, `k` and `ms`.)

local created = 0
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = spec.new
  redis.call('SET', KEYS[2], epoch)
  created = 1
end
if epoch ~= spec.e and not spec.full then
  return {-1, now, epoch}
end


for _, p in ipairs(spec.push) do
  if p.kind == 's' then
    for j, t in ipairs(p.times) do
      if t > now - p.span then redis.call('ZADD', k(p.log), t, spec.g .. ':' .. j) end
    end
    redis.call('PEXPIRE', k(p.log), ms(p.span) + 1000)
  elseif p.kind == 'f' then
    if p.fend > now then
      redis.call('INCRBY', k(p.log), p.count)
      redis.call('PEXPIREAT', k(p.log), ms(p.fend) + 1000)
    end
  else
    for _, bc in ipairs(p.buckets) do
      local b, n = bc[1], bc[2]
      if (b + 1) * p.bw + p.span > now then
        redis.call('HINCRBY', k(p.log), b, n)
        redis.call('ZADD', k(p.bidx), b, b)
        redis.call('INCRBY', k(p.btot), n)
      end
    end
    for _, key in ipairs({p.log, p.bidx, p.btot}) do
      redis.call('PEXPIRE', k(key), ms(p.span + p.bw) + 1000)
    end
  end
end

-- Still on its own until its first decision: the others keep leaving its share to it (it is
-- listed as unheard for a moment longer than the silence that reserves a share).
redis.call('ZADD', KEYS[3], now - spec.sil - 1, spec.r)
redis.call('HSET', KEYS[4], spec.r, epoch)
local reply = {created, now, epoch}
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  if all[i + 1] == epoch then reply[#reply + 1] = all[i] end
end
return reply
