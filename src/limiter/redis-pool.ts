import type { Redis } from 'ioredis'
import { BUCKET_PREFIX } from '../redis/keys.js'
import type { LeaseGrant, LeasePool, LeaseRequest } from './pool.js'

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
 * KEYS[1]: the bucket. ARGV: limit, window ms, want, holders.
 * Returns {granted, remaining, resetMs, windowStart}. The grant size is grantSize() of src/limiter/pool.ts.
 */
const ACQUIRE_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local holders = tonumber(ARGV[4])
local start = now - (now % win)
local v = redis.call('HMGET', KEYS[1], 'w', 'c')
local fresh = tonumber(v[1]) ~= start
local c = 0
if not fresh then c = tonumber(v[2]) or 0 end
local left = limit - c
local grant = 0
if left > 0 then
  grant = math.min(want, left, math.max(1, math.floor(left / (4 * holders))))
  redis.call('HSET', KEYS[1], 'w', start, 'c', c + grant)
  if fresh then redis.call('PEXPIRE', KEYS[1], start + win - now + 1000) end
end
local remaining = left - grant
if remaining < 0 then remaining = 0 end
return {grant, remaining, start + win - now, start}
`

/**
 * Deletes a rule's buckets (or one, when `bucket` is given) from Redis, one key per command (Cluster-ready);
 * returns how many were deleted.
 */
export async function resetBuckets(redis: Redis, rule: string, bucket: string | undefined): Promise<number> {
  if (bucket !== undefined) return redis.del(BUCKET_PREFIX + bucket)
  let cleared = await redis.del(BUCKET_PREFIX + rule)
  let cursor = '0'
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${BUCKET_PREFIX}${rule}|*`, 'COUNT', 500)
    cursor = next
    for (const k of keys) cleared += await redis.del(k)
  } while (cursor !== '0')
  return cleared
}

/* KEYS[1]: the bucket. ARGV: window start, tokens. Gives tokens back if the window is still the bucket's. */
const RELEASE_SCRIPT = `
local v = redis.call('HMGET', KEYS[1], 'w', 'c')
if tonumber(v[1]) ~= tonumber(ARGV[1]) then return 0 end
local c = (tonumber(v[2]) or 0) - tonumber(ARGV[2])
if c < 0 then c = 0 end
redis.call('HSET', KEYS[1], 'c', c)
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
  readonly #acquire: Script
  readonly #release: Script
  readonly #calls: RedisCalls

  constructor(redis: Redis, calls: RedisCalls) {
    this.#redis = redis
    this.#calls = calls
    redis.defineCommand('meliproxyLease', { numberOfKeys: 1, lua: ACQUIRE_SCRIPT })
    redis.defineCommand('meliproxyRelease', { numberOfKeys: 1, lua: RELEASE_SCRIPT })
    const r = redis as unknown as { meliproxyLease: Script; meliproxyRelease: Script }
    this.#acquire = r.meliproxyLease.bind(redis)
    this.#release = r.meliproxyRelease.bind(redis)
  }

  /** True while the connection is up (commands are not queued while it is down: they fail at once). */
  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    return this.#acquire(BUCKET_PREFIX + req.key, req.limit, req.windowMs, req.want, req.holders).then(
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
  release(key: string, windowStart: number, tokens: number): void {
    if (!this.ready) return
    this.#release(BUCKET_PREFIX + key, windowStart, tokens).then(
      () => this.#calls.call('release', true),
      () => this.#calls.call('release', false),
    )
  }
}
