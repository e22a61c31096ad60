import type { Redis } from 'ioredis'
import { BUCKET_PREFIX } from '../redis/keys.js'
import { BUCKET_SLOT_MS, SLIDING_SLOTS, type Algorithm, type LeaseGrant, type LeasePool, type LeaseRequest } from './pool.js'

/**
 * The lease pool in Redis, shared by every worker of every instance. Each bucket is one hash (`w` = window start,
 * `c` = tokens granted in that window), and every operation is one script on that one key, so the limiter can run
 * on Redis Cluster as it is. Redis runs a script alone, so a grant is atomic: no two holders can be granted the same
 * token. The window comes from Redis's own clock (TIME), so instances with skewed clocks agree on window edges.
 *
 * A grant costs one EVALSHA and, inside it, TIME, HMGET and HSET (PEXPIRE once per window): four commands for a
 * block of tokens, where the per-request design spent about seven per request.
 *
 * rate-limiter-flexible is not used for this: its consume() increments before it checks, so a rejected request
 * would still use up budget, and it cannot grant a block of tokens sized by what is left.
 */



/*
 * What every acquire script starts with: Redis's clock (so instances with skewed clocks agree), ARGV[1..4] (limit or
 * rate per window, window ms, want, holders), and grantSize() of src/limiter/pool.ts, in one place.
 */
const ACQUIRE_HEAD = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local holders = tonumber(ARGV[4])
local function grantSize(left)
  if left <= 0 then return 0 end
  return math.min(want, left, math.max(1, math.floor(left / (4 * holders))))
end
`

/*
 * KEYS[1]: the bucket. ARGV: limit, window ms, want, holders.
 * Returns {granted, remaining, resetMs, windowStart}. The grant size is grantSize() of src/limiter/pool.ts.
 */
const ACQUIRE_SCRIPT = ACQUIRE_HEAD + `
local start = now - (now % win)
local v = redis.call('HMGET', KEYS[1], 'w', 'c')
local fresh = tonumber(v[1]) ~= start
local c = 0
if not fresh then c = tonumber(v[2]) or 0 end
local left = limit - c
local grant = grantSize(left)
if grant > 0 then
  redis.call('HSET', KEYS[1], 'w', start, 'c', c + grant)
  if fresh then redis.call('PEXPIRE', KEYS[1], start + win - now + 1000) end
end
local remaining = left - grant
if remaining < 0 then remaining = 0 end
return {grant, remaining, start + win - now, start}
`

/*
 * A sliding window: KEYS[1] a hash of slot start -> tokens granted in that slot. ARGV: limit, window ms, want,
 * holders, slots. The current slot and the `slots` before it may hold at most `limit` (src/limiter/pool.ts).
 */
const SLIDING_SCRIPT = ACQUIRE_HEAD + `
local slotMs = win / tonumber(ARGV[5])
local slot = now - (now % slotMs)
local oldest = slot - win
local all = redis.call('HGETALL', KEYS[1])
local used = 0
for i = 1, #all, 2 do
  local s = tonumber(all[i])
  if s ~= nil then
    if s < oldest then redis.call('HDEL', KEYS[1], all[i]) else used = used + tonumber(all[i + 1]) end
  end
end
local left = limit - used
local grant = grantSize(left)
if grant > 0 then
  redis.call('HINCRBY', KEYS[1], slot, grant)
  redis.call('PEXPIRE', KEYS[1], win + slotMs + 1000)
end
local remaining = left - grant
if remaining < 0 then remaining = 0 end
local reset = slot + slotMs - now
if grant == 0 then
  -- Full: room comes back when the oldest slots leave the window (a slot counts until a window after its end).
  local starts = {}
  local counts = {}
  for i = 1, #all, 2 do
    local s = tonumber(all[i])
    if s ~= nil and s >= oldest then
      starts[#starts + 1] = s
      counts[s] = tonumber(all[i + 1])
    end
  end
  table.sort(starts)
  local freed = used
  for _, s in ipairs(starts) do
    freed = freed - counts[s]
    if freed < limit then
      reset = math.max(reset, s + slotMs + win - now)
      break
    end
  end
end
return {grant, remaining, reset, slot}
`

/*
 * A token bucket, leased: KEYS[1] a hash (l = tokens in the bucket, t = when l was computed, s = the current lease
 * slot, h = tokens granted in it and not given back). ARGV: rate (tokens per window), window ms, want, holders,
 * burst, slot ms. The bucket refills only up to burst - h (src/limiter/pool.ts says why; MemoryPool does the same).
 * Returns {granted, remaining, resetMs, slot}.
 */
const TOKEN_BUCKET_SCRIPT = ACQUIRE_HEAD + `
local perMs = limit / win
local burst = tonumber(ARGV[5])
local slotMs = tonumber(ARGV[6])
local slot = now - (now % slotMs)
local v = redis.call('HMGET', KEYS[1], 'l', 't', 's', 'h')
local level = burst
local held = 0
if v[1] and v[2] and v[3] and v[4] then
  level = tonumber(v[1])
  local at = tonumber(v[2])
  local oldSlot = tonumber(v[3])
  held = tonumber(v[4])
  if oldSlot ~= slot then
    local slotEnd = oldSlot + slotMs
    level = math.min(burst - held, level + (slotEnd - at) * perMs)
    level = math.min(burst, level + (now - slotEnd) * perMs)
    held = 0
  else
    level = math.min(burst - held, level + (now - at) * perMs)
  end
end
local left = math.floor(level)
local grant = grantSize(left)
level = level - grant
held = held + grant
redis.call('HSET', KEYS[1], 'l', tostring(level), 't', now, 's', slot, 'h', held)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / perMs) + slotMs + 1000)
local reset = slot + slotMs - now
if grant == 0 then
  local wait = math.ceil((1 - level) / perMs)
  if burst - held >= 1 then reset = 0 end
  reset = math.max(1, wait, reset)
end
return {grant, math.floor(level), reset, slot}
`

/* KEYS[1]: the bucket. ARGV: window start, tokens. Gives tokens back if the window is still the bucket's. */
const RELEASE_SCRIPT = `
local v = redis.call('HMGET', KEYS[1], 'w', 'c')
if tonumber(v[1]) ~= tonumber(ARGV[1]) then return 0 end
local c = (tonumber(v[2]) or 0) - tonumber(ARGV[2])
if c < 0 then c = 0 end
redis.call('HSET', KEYS[1], 'c', c)
return 1
`

/* A sliding window's release: KEYS[1], ARGV: slot start, tokens. Gives tokens back to the slot they came from. */
const SLIDING_RELEASE_SCRIPT = `
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if n == nil then return 0 end
n = n - tonumber(ARGV[2])
if n < 0 then n = 0 end
redis.call('HSET', KEYS[1], ARGV[1], n)
return 1
`

/* A token bucket's release: KEYS[1], ARGV: slot start, tokens. Held tokens of the current slot go back in the bucket. */
const BUCKET_RELEASE_SCRIPT = `
local v = redis.call('HMGET', KEYS[1], 'l', 's', 'h')
if not v[1] or tonumber(v[2]) ~= tonumber(ARGV[1]) then return 0 end
local back = math.min(tonumber(ARGV[2]), tonumber(v[3]))
redis.call('HSET', KEYS[1], 'l', tostring(tonumber(v[1]) + back), 'h', tonumber(v[3]) - back)
return 1
`

type Script = (key: string, ...args: number[]) => Promise<number[] | number>

/** Counts Redis calls (the limiter's metrics). */
export interface RedisCalls {
  call(op: 'acquire' | 'release', ok: boolean): void
}

/** Leases from Redis. Rejects when Redis does (the limiter falls back). */
export class RedisPool implements LeasePool {
  readonly #redis: Redis
  readonly #acquire: Record<Algorithm, Script>
  readonly #release: Record<Algorithm, Script>
  readonly #calls: RedisCalls

  constructor(redis: Redis, calls: RedisCalls) {
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
    this.#release = {
      fixed: script('meliproxyRelease', RELEASE_SCRIPT),
      sliding: script('meliproxySlidingRelease', SLIDING_RELEASE_SCRIPT),
      'token-bucket': script('meliproxyBucketRelease', BUCKET_RELEASE_SCRIPT),
    }
  }

  /** True while the connection is up (commands are not queued while it is down: they fail at once). */
  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    const key = BUCKET_PREFIX + req.key
    const reply =
      req.algorithm === 'sliding'
        ? this.#acquire.sliding(key, req.limit, req.windowMs, req.want, req.holders, SLIDING_SLOTS)
        : req.algorithm === 'token-bucket'
          ? this.#acquire['token-bucket'](key, req.limit, req.windowMs, req.want, req.holders, req.burst, BUCKET_SLOT_MS)
          : this.#acquire.fixed(key, req.limit, req.windowMs, req.want, req.holders)
    return reply.then(
      (out) => {
        this.#calls.call('acquire', true)
        const o = out as number[]
        return { granted: o[0]!, remaining: o[1]!, resetMs: o[2]!, windowStart: o[3]! }
      },
      (err: Error) => {
        this.#calls.call('acquire', false)
        throw err
      },
    )
  }

  /**
   * Gives tokens back. Not retried when it fails: the command may still have applied (a timeout does not cancel
   * it), and a token given back twice would be granted twice. A lost release only under-admits.
   */
  release(key: string, windowStart: number, tokens: number, algorithm: Algorithm): void {
    if (!this.ready) return
    this.#release[algorithm](BUCKET_PREFIX + key, windowStart, tokens).then(
      () => this.#calls.call('release', true),
      () => this.#calls.call('release', false),
    )
  }
}
