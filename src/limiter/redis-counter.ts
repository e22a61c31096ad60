import type { Redis } from 'ioredis'
import type { CounterStore, TakeItem, TakeResult } from './counter.js'

/**
 * The counting contract in Redis, shared by every worker of every instance. One Lua script takes for a batch of
 * requests, one request after another: for each, it checks every bucket and increments them only if all have room.
 * Redis runs a script alone, so this is atomic, and a batch gives exactly the result the same requests would get
 * one script call each. The window comes from Redis's own clock (TIME), so instances with skewed clocks still agree
 * on window edges.
 *
 * Requests that arrive in the same event-loop turn share one script call (up to MAX_BATCH): one round trip and one
 * command instead of one per request.
 *
 * rate-limiter-flexible is not used for this: its consume() increments before it checks, so a rejected request
 * would still use up budget, and RateLimiterUnion does not undo the rules that had room. Either way a rejected
 * request could make a later one fail that should pass, which breaks "exactly L per window".
 */

/** Key prefix of every limiter bucket (a hash with fields w = window start, c = count). */
export const BUCKET_PREFIX = 'mp:rl:'

const MAX_BATCH = 64

/*
 * KEYS: the buckets of every request in the batch, in order.
 * ARGV: the number of requests, then per request its bucket count k followed by k pairs (limit, window ms).
 * Returns, per request: {1, remaining1, reset1, ..., remainingk, resetk} flattened, or {0, failedIndex, reset}.
 */
const TAKE_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local a = 2
local k0 = 0
for r = 1, tonumber(ARGV[1]) do
  local k = tonumber(ARGV[a])
  local starts, counts = {}, {}
  local failed = -1
  local failedReset = 0
  for i = 1, k do
    local limit = tonumber(ARGV[a + 2 * i - 1])
    local win = tonumber(ARGV[a + 2 * i])
    local start = now - (now % win)
    local v = redis.call('HMGET', KEYS[k0 + i], 'w', 'c')
    local c = 0
    if tonumber(v[1]) == start then c = tonumber(v[2]) or 0 end
    if c >= limit then
      failed = i - 1
      failedReset = start + win - now
      break
    end
    starts[i] = start
    counts[i] = c
  end
  if failed >= 0 then
    out[#out + 1] = 0
    out[#out + 1] = failed
    out[#out + 1] = failedReset
  else
    out[#out + 1] = 1
    for i = 1, k do
      local limit = tonumber(ARGV[a + 2 * i - 1])
      local win = tonumber(ARGV[a + 2 * i])
      local c = counts[i] + 1
      local reset = starts[i] + win - now
      redis.call('HSET', KEYS[k0 + i], 'w', starts[i], 'c', c)
      redis.call('PEXPIRE', KEYS[k0 + i], reset + 1000)
      out[#out + 1] = limit - c
      out[#out + 1] = reset
    end
  end
  a = a + 1 + 2 * k
  k0 = k0 + k
end
return out
`

type TakeCommand = (...args: (string | number)[]) => Promise<number[]>

interface Pending {
  readonly items: readonly TakeItem[]
  readonly resolve: (r: TakeResult) => void
  readonly reject: (err: Error) => void
}

/** Counts in Redis through the take script. Rejects when Redis does (the caller falls back). */
export class RedisCounter implements CounterStore {
  readonly #redis: Redis
  readonly #take: TakeCommand
  #queue: Pending[] = []
  #scheduled = false

  constructor(redis: Redis) {
    this.#redis = redis
    redis.defineCommand('meliproxyTake', { lua: TAKE_SCRIPT })
    this.#take = (redis as unknown as { meliproxyTake: TakeCommand }).meliproxyTake.bind(redis)
  }

  /** True while the connection is up (commands are not queued while it is down: they fail at once). */
  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  /** Takes one unit from every bucket or from none, in the next batch. */
  take(items: readonly TakeItem[]): Promise<TakeResult> {
    return new Promise((resolve, reject) => {
      this.#queue.push({ items, resolve, reject })
      if (!this.#scheduled) {
        this.#scheduled = true
        setImmediate(this.#flush)
      }
    })
  }

  readonly #flush = (): void => {
    this.#scheduled = false
    const queue = this.#queue
    this.#queue = []
    for (let i = 0; i < queue.length; i += MAX_BATCH) this.#send(queue.slice(i, i + MAX_BATCH))
  }

  #send(batch: Pending[]): void {
    const keys: string[] = []
    const argv: number[] = [batch.length]
    for (const p of batch) {
      argv.push(p.items.length)
      for (const it of p.items) {
        keys.push(BUCKET_PREFIX + it.key)
        argv.push(it.limit, it.windowMs)
      }
    }
    this.#take(keys.length, ...keys, ...argv).then(
      (out) => {
        let o = 0
        for (const p of batch) {
          if (out[o] === 0) {
            p.resolve({ allowed: false, failed: out[o + 1]!, resetMs: out[o + 2]! })
            o += 3
            continue
          }
          const n = p.items.length
          const remaining: number[] = new Array(n)
          const resetMs: number[] = new Array(n)
          for (let i = 0; i < n; i++) {
            remaining[i] = out[o + 1 + 2 * i]!
            resetMs[i] = out[o + 2 + 2 * i]!
          }
          o += 1 + 2 * n
          p.resolve({ allowed: true, remaining, resetMs })
        }
      },
      (err: Error) => {
        for (const p of batch) p.reject(err)
      },
    )
  }
}
