import type { Redis } from 'ioredis'
import type { CounterStore, TakeItem, TakeResult } from './counter.js'

/**
 * The counting contract in Redis, shared by every worker of every instance: one Lua script checks every bucket of a
 * request and increments them only if all have room, atomically (Redis runs a script alone). The window comes from
 * Redis's own clock (TIME), so instances with skewed clocks still agree on window edges.
 *
 * rate-limiter-flexible is not used for this: its consume() increments before it checks, so a rejected request
 * would still use up budget, and RateLimiterUnion does not undo the rules that had room. Either way a rejected
 * request could make a later one fail that should pass, which breaks "exactly L per window".
 */

/** Key prefix of every limiter bucket (a hash with fields w = window start, c = count). */
export const BUCKET_PREFIX = 'mp:rl:'

const TAKE_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local starts, counts = {}, {}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local win = tonumber(ARGV[2 * i])
  local start = now - (now % win)
  local v = redis.call('HMGET', KEYS[i], 'w', 'c')
  local c = 0
  if tonumber(v[1]) == start then c = tonumber(v[2]) or 0 end
  if c >= limit then return {0, i - 1, start + win - now} end
  starts[i] = start
  counts[i] = c
end
local out = {1}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local win = tonumber(ARGV[2 * i])
  local c = counts[i] + 1
  local reset = starts[i] + win - now
  redis.call('HSET', KEYS[i], 'w', starts[i], 'c', c)
  redis.call('PEXPIRE', KEYS[i], reset + 1000)
  out[2 * i] = limit - c
  out[2 * i + 1] = reset
end
return out
`

type TakeCommand = (...args: (string | number)[]) => Promise<number[]>

/** Counts in Redis through the take script. Rejects when Redis does (the caller falls back). */
export class RedisCounter implements CounterStore {
  readonly #redis: Redis
  readonly #take: TakeCommand

  constructor(redis: Redis) {
    this.#redis = redis
    redis.defineCommand('meliproxyTake', { lua: TAKE_SCRIPT })
    this.#take = (redis as unknown as { meliproxyTake: TakeCommand }).meliproxyTake.bind(redis)
  }

  /** True while the connection is up (commands are not queued while it is down: they fail at once). */
  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  /** Takes one unit from every bucket or from none; the first argument tells the script how many keys follow. */
  async take(items: readonly TakeItem[]): Promise<TakeResult> {
    const args: (string | number)[] = [items.length]
    for (const it of items) args.push(BUCKET_PREFIX + it.key)
    for (const it of items) args.push(it.limit, it.windowMs)
    const r = await this.#take(...args)
    if (r[0] === 0) return { allowed: false, failed: r[1]!, resetMs: r[2]! }
    const remaining: number[] = new Array(items.length)
    const resetMs: number[] = new Array(items.length)
    for (let i = 0; i < items.length; i++) {
      // The script returns {1, remaining1, reset1, remaining2, reset2, ...}.
      remaining[i] = r[2 * i + 1]!
      resetMs[i] = r[2 * i + 2]!
    }
    return { allowed: true, remaining, resetMs }
  }
}
