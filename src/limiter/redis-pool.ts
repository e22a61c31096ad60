import { isCluster, type RedisClient } from '../redis/cluster.js'
import { BUCKET_PREFIX } from '../redis/keys.js'
import { bucketSlotMs, SHAPE_SETTLE_MS, shapeOf, SLIDING_SLOTS, STALE_RETRY_MS, type LeasePool } from './pool.js'
import type { Algorithm, Giveback, LeaseGrant, LeaseRequest } from './types.js'

/**
 * The lease pool in Redis, shared by every worker of every instance. Each bucket is one hash (`w` = window start,
 * `c` = tokens granted in that window), and every operation is one script on that one key, so the limiter can run
 * on Redis Cluster as it is. Redis runs a script alone, so a grant is atomic: no two holders can be granted the same
 * token. The window comes from Redis's own clock (TIME), so instances with skewed clocks agree on window edges.
 *
 * A grant costs one EVALSHA and, inside it, TIME, HGET of the shape, HMGET and HSET (PEXPIRE once per window): five
 * commands for a block of tokens. A give-back is one EVALSHA of three or four.
 *
 * rate-limiter-flexible is not used for this: its consume() increments before it checks, so a rejected request
 * would still use up budget, and it cannot grant a block of tokens sized by what is left.
 */



/*
 * What every acquire script starts with: Redis's clock (so instances with skewed clocks agree), the arguments
 * (limit or rate per window, window ms, want, holders, need, shape, burst, slot ms), grantSize() of
 * src/limiter/pool.ts, and the carry-over of a changed rule: when the bucket's state was made under another shape,
 * what that shape counts now is carried into the new one (`fresh` with `carried` units), as MemoryPool does.
 */
const ACQUIRE_HEAD = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local holders = tonumber(ARGV[4])
local need = tonumber(ARGV[5])
local shape = ARGV[6]
local burst = tonumber(ARGV[7])
local slotMs = tonumber(ARGV[8])
local function grantSize(left)
  if left < need or left <= 0 then return 0 end
  return math.max(need, math.min(want, left, math.max(1, math.floor(left / (4 * holders)))))
end
local function fill(level, from, to, cap, l, w)
  if level >= cap then return level end
  return math.min(cap, level + (to - from) * l / w)
end
-- A token bucket's level now (refilled() of src/limiter/pool.ts): to b - h - k until its slot ends, to b - h until
-- the next one ends, then to b.
local function refill(lv, at, s, h, k, m, b, l, w)
  if s < 0 then return lv end
  local e1 = s + m
  local e2 = e1 + m
  lv = fill(lv, at, math.min(now, e1), b - h - k, l, w)
  if now <= e1 then return lv end
  lv = fill(lv, e1, math.min(now, e2), b - h, l, w)
  if now <= e2 then return lv end
  return fill(lv, e2, now, b, l, w)
end
-- Where the new rule's counting reaches back to (horizonOf() of src/limiter/pool.ts).
local alg = string.match(shape, '^([%a%-]+)/')
local horizon
if alg == 'fixed' then horizon = now - (now % win)
elseif alg == 'sliding' then horizon = now - (now % slotMs) - win
else horizon = now - math.ceil(burst * win / limit) end
-- What the old shape counted after the horizon (used() of src/limiter/pool.ts).
local function usedBy(old)
  local oa, l, w, b = string.match(old, '^([%a%-]+)/([%d%.]+)/([%d%.]+)/([%d%.]+)$')
  if not oa then return 0 end
  l = tonumber(l)
  w = tonumber(w)
  b = tonumber(b)
  if oa == 'fixed' then
    local v = redis.call('HMGET', KEYS[1], 'w', 'c')
    local ws = tonumber(v[1])
    if ws and ws + w > horizon then return tonumber(v[2]) or 0 end
    return 0
  end
  if oa == 'sliding' then
    -- The slots the old rule still counts (its window) that end after the horizon.
    local sm = w / ${SLIDING_SLOTS}
    local oldest = now - (now % sm) - w
    local all = redis.call('HGETALL', KEYS[1])
    local n = 0
    for i = 1, #all, 2 do
      local s = tonumber(all[i])
      if s and s >= oldest and s + sm > horizon then n = n + tonumber(all[i + 1]) end
    end
    return n
  end
  local v = redis.call('HMGET', KEYS[1], 'l', 't', 's', 'h', 'k', 'm')
  local lv, at, s, h, m = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4]), tonumber(v[6])
  if not (lv and at and s and h and m) then return 0 end
  return math.max(0, math.ceil(b - refill(lv, at, s, h, tonumber(v[5]) or 0, m, b, l, w) - 1e-9))
end
local fresh = false
local carried = 0
local seen = redis.call('HMGET', KEYS[1], 'v', 'vp', 'vs')
local old = seen[1]
-- A holder still under the rule before the last change is refused until it hears of the new one.
if old ~= shape and shape == seen[2] and now - (tonumber(seen[3]) or 0) < ${SHAPE_SETTLE_MS} then
  return {0, 0, ${STALE_RETRY_MS}, -1, ${STALE_RETRY_MS}}
end
if old and old ~= shape then
  carried = usedBy(old)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'vp', old, 'vs', now)
  redis.call('PEXPIRE', KEYS[1], ${SHAPE_SETTLE_MS} + 1000)
  fresh = true
elseif not old then
  fresh = redis.call('EXISTS', KEYS[1]) == 0
end
`

/*
 * A fixed window: KEYS[1] a hash (w = window start, c = tokens granted in it, v = shape).
 * Returns {granted, remaining, resetMs, windowStart, retryMs}.
 */
const ACQUIRE_SCRIPT = ACQUIRE_HEAD + `
local start = now - (now % win)
local c = carried
if not fresh then
  local v = redis.call('HMGET', KEYS[1], 'w', 'c')
  if tonumber(v[1]) == start then c = tonumber(v[2]) or 0 else fresh = true end
end
local left = limit - c
local grant = grantSize(left)
if grant > 0 or carried > 0 then
  redis.call('HSET', KEYS[1], 'w', start, 'c', c + grant, 'v', shape)
  if fresh then redis.call('PEXPIRE', KEYS[1], start + win - now + 1000) end
end
local remaining = left - grant
if remaining < 0 then remaining = 0 end
local retry = 0
if grant == 0 then retry = start + win - now end
return {grant, remaining, start + win - now, start, retry}
`

/*
 * A sliding window: KEYS[1] a hash of slot start -> tokens granted in that slot (and v = shape). The current slot and
 * the slots before it within a window may hold at most `limit` (src/limiter/pool.ts).
 */
const SLIDING_SCRIPT = ACQUIRE_HEAD + `
local slot = now - (now % slotMs)
local oldest = slot - win
local starts = {}
local counts = {}
local used = 0
if carried > 0 then
  redis.call('HSET', KEYS[1], slot, carried, 'v', shape)
  redis.call('PEXPIRE', KEYS[1], win + slotMs + 1000)
  starts[1] = slot
  counts[slot] = carried
  used = carried
elseif not fresh then
  -- Only the slots that can count now are read (the hash also holds give-back records): the current one and the
  -- ${SLIDING_SLOTS} before it.
  local fields = {}
  for i = 0, ${SLIDING_SLOTS} do fields[i + 1] = slot - i * slotMs end
  local counts0 = redis.call('HMGET', KEYS[1], unpack(fields))
  for i = 1, #fields do
    local n = tonumber(counts0[i])
    if n ~= nil and n > 0 then
      local s = fields[i]
      used = used + n
      starts[#starts + 1] = s
      counts[s] = n
    end
  end
end
local left = limit - used
local grant = grantSize(left)
if grant > 0 then
  redis.call('HINCRBY', KEYS[1], slot, grant)
  if old ~= shape then redis.call('HSET', KEYS[1], 'v', shape) end
  redis.call('PEXPIRE', KEYS[1], win + slotMs + 1000)
  -- The window before this one has left it: its slots go (a key granted from at least once a window keeps no more).
  local gone = {}
  for i = ${SLIDING_SLOTS} + 1, 2 * ${SLIDING_SLOTS} + 1 do gone[#gone + 1] = slot - i * slotMs end
  redis.call('HDEL', KEYS[1], unpack(gone))
end
local remaining = left - grant
if remaining < 0 then remaining = 0 end
local reset = slot + slotMs - now
local retry = 0
if grant == 0 then
  -- Full: room for need comes back when enough of the oldest slots leave the window (a slot counts until a window
  -- after its end).
  retry = reset
  table.sort(starts)
  local still = used
  for _, s in ipairs(starts) do
    still = still - counts[s]
    if limit - still >= need then
      retry = math.max(retry, s + slotMs + win - now)
      break
    end
  end
end
return {grant, remaining, reset, slot, retry}
`

/*
 * A token bucket, leased: KEYS[1] a hash (l = tokens in the bucket, t = when l was computed, s = the current lease
 * slot, h = tokens granted in it, k = tokens granted in the slot before, m = the slot's length, v = shape). A lease
 * lasts until the next slot ends; the bucket refills only up to burst - h - k meanwhile (src/limiter/pool.ts says why;
 * MemoryPool does the same).
 */
const TOKEN_BUCKET_SCRIPT = ACQUIRE_HEAD + `
local perMs = limit / win
local slot = now - (now % slotMs)
local level = burst
local held = 0
local prev = 0
local oldSlot = -1
if fresh then
  level = math.max(0, burst - carried)
else
  local v = redis.call('HMGET', KEYS[1], 'l', 't', 's', 'h', 'k')
  if v[1] and v[2] and v[3] and v[4] then
    oldSlot = tonumber(v[3])
    held = tonumber(v[4])
    prev = tonumber(v[5]) or 0
    level = refill(tonumber(v[1]), tonumber(v[2]), oldSlot, held, prev, slotMs, burst, limit, win)
  end
end
if oldSlot ~= slot then
  if oldSlot >= 0 and oldSlot + slotMs == slot then prev = held else prev = 0 end
  held = 0
end
local grant = grantSize(math.floor(level))
level = level - grant
-- The need tokens go to the request that asked, at once: not held (src/limiter/pool.ts).
if grant > 0 then held = held + grant - need end
redis.call('HSET', KEYS[1], 'l', tostring(level), 't', now, 's', slot, 'h', held, 'k', prev, 'm', slotMs, 'v', shape)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - level) / perMs) + 2 * slotMs + 1000)
local reset = slot + 2 * slotMs - now
local retry = 0
if grant == 0 then
  -- When need tokens can be granted (bucketRetryMs of src/limiter/pool.ts).
  local lengths = {slot + slotMs - now, slotMs}
  local caps = {burst - held - prev, burst - held}
  local t = 0
  local lv = level
  for i = 1, 2 do
    if retry == 0 and caps[i] >= need then
      local wait = math.max(0, (need - lv) / perMs)
      if wait <= lengths[i] then retry = math.max(1, math.ceil(t + wait)) end
    end
    if retry == 0 then
      if lv < caps[i] then lv = math.min(caps[i], lv + lengths[i] * perMs) end
      t = t + lengths[i]
    end
  end
  if retry == 0 then retry = math.max(1, math.ceil(t + math.max(0, (need - lv) / perMs))) end
end
local remaining = math.floor(level)
if remaining < 0 then remaining = 0 end
return {grant, remaining, reset, slot, retry}
`

/*
 * A give-back, for every algorithm. KEYS[1]: the bucket. ARGV: window (or slot) start,
 * tokens, algorithm, shape, holder, seq. Applied at most once per (holder, seq), and only to the window and shape the
 * tokens came from.
 */
const RELEASE_SCRIPT = `
local v = redis.call('HMGET', KEYS[1], 'v', 'g:' .. ARGV[5])
if v[1] ~= ARGV[4] then return 0 end
local seq = tonumber(ARGV[6])
if v[2] and tonumber(v[2]) >= seq then return 0 end
redis.call('HSET', KEYS[1], 'g:' .. ARGV[5], seq)
local ws = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
if ARGV[3] == 'token-bucket' then
  -- Tokens of a lease that has not ended: granted in the current slot (h) or the one before (k).
  local b = redis.call('HMGET', KEYS[1], 'l', 's', 'h', 'k', 'm')
  local s = tonumber(b[2])
  if s == ws then
    local back = math.min(n, tonumber(b[3]))
    redis.call('HSET', KEYS[1], 'l', tostring(tonumber(b[1]) + back), 'h', tonumber(b[3]) - back)
  elseif s and s - tonumber(b[5]) == ws then
    local back = math.min(n, tonumber(b[4]) or 0)
    redis.call('HSET', KEYS[1], 'l', tostring(tonumber(b[1]) + back), 'k', (tonumber(b[4]) or 0) - back)
  else
    return 0
  end
elseif ARGV[3] == 'sliding' then
  local c = (tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0) - n
  if c < 0 then c = 0 end
  redis.call('HSET', KEYS[1], ARGV[1], c)
else
  local w = redis.call('HMGET', KEYS[1], 'w', 'c')
  if tonumber(w[1]) ~= ws then return 0 end
  local c = (tonumber(w[2]) or 0) - n
  if c < 0 then c = 0 end
  redis.call('HSET', KEYS[1], 'c', c)
end
return 1
`

type Script = (key: string, ...args: (number | string)[]) => Promise<number[] | number>

/** Counts Redis calls (the limiter's metrics). */
export interface RedisCalls {
  call(op: 'acquire' | 'release', ok: boolean): void
}

/** Leases from Redis. Rejects when Redis does (the limiter falls back). */
export class RedisPool implements LeasePool {
  readonly #redis: RedisClient
  readonly #acquire: Record<Algorithm, Script>
  readonly #release: Script
  readonly #calls: RedisCalls

  constructor(redis: RedisClient, calls: RedisCalls) {
    this.#redis = redis
    this.#calls = calls
    const script = (name: string, lua: string): Script => {
      redis.defineCommand(name, { numberOfKeys: 1, lua })
      return (redis as unknown as Record<string, Script>)[name]!.bind(redis)
    }
    this.#acquire = {
      fixed: script('meliproxyLease', ACQUIRE_SCRIPT),
      sliding: script('meliproxySlidingLease', SLIDING_SCRIPT),
      'token-bucket': script('meliproxyBucketTake', TOKEN_BUCKET_SCRIPT),
    }
    this.#release = script('meliproxyGiveback', RELEASE_SCRIPT)
  }

  /** True while the connection is up (commands are not queued while it is down: they fail at once). */
  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  /** True on a Redis Cluster: one call failing says nothing of buckets on the other masters. */
  get perKeyFailures(): boolean {
    return isCluster(this.#redis)
  }

  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    const slotMs =
      req.algorithm === 'sliding' ? req.windowMs / SLIDING_SLOTS : req.algorithm === 'token-bucket' ? bucketSlotMs(req.limit, req.windowMs, req.burst) : 0
    const shape = shapeOf(req.algorithm, req.limit, req.windowMs, req.burst)
    return this.#acquire[req.algorithm](BUCKET_PREFIX + req.key, req.limit, req.windowMs, req.want, req.holders, req.need, shape, req.burst, slotMs).then(
      (out) => {
        this.#calls.call('acquire', true)
        const o = out as number[]
        return { granted: o[0]!, remaining: o[1]!, resetMs: o[2]!, windowStart: o[3]!, retryMs: o[4]! }
      },
      (err: Error) => {
        this.#calls.call('acquire', false)
        throw err
      },
    )
  }

  /**
   * Gives tokens back. Applied at most once per (holder, seq) however often it is
   * delivered; not retried when it fails (a lost give-back only under-admits).
   */
  release(g: Giveback): void {
    if (!this.ready) return
    this.#release(BUCKET_PREFIX + g.key, g.windowStart, g.tokens, g.algorithm, g.shape, g.holder, g.seq).then(
      () => this.#calls.call('release', true),
      () => this.#calls.call('release', false),
    )
  }
}
