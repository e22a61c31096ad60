import t from 'tap'
import type { Redis } from 'ioredis'
import { MemoryPool, shapeOf } from '../../src/limiter/pool.js'
import type { Algorithm, Giveback, LeaseGrant, LeaseRequest } from '../../src/limiter/types.js'
import { RedisPool } from '../../src/limiter/redis-pool.js'
import { startRedis } from '../helpers/redis.js'

/*
 * Differential test: the MemoryPool (the primary's pool) and the Lua scripts (the Redis pool) must compute the same
 * grants, remaining, resets and retries, carry the same counts over a rule change, and apply the same give-backs
 * (each (holder, seq) once). Both run on one clock: the scripts' TIME is replaced by a key the test sets before each
 * call, so random sequences (clock steps from 0 ms to an hour, shape changes across every algorithm, re-sent
 * give-backs) can be compared exactly. Charges (offline admissions) are left out: only the primary's pool gets them.
 * A failure prints the seed and the steps that led to it.
 */

const RUNS = Number(process.env.POOL_DIFF_RUNS ?? 150)
const STEPS = 60
const SEED = Number(process.env.POOL_DIFF_SEED ?? 19)

const TIME_LINES = /local t = redis\.call\('TIME'\)\nlocal now = tonumber\(t\[1\]\) \* 1000 \+ math\.floor\(tonumber\(t\[2\]\) \/ 1000\)/
const CLOCK_KEY = 'test:pool-differential:now'

/** A RedisPool whose scripts read the clock from CLOCK_KEY instead of TIME. */
function pinnedPool(redis: Redis): RedisPool {
  const define = redis.defineCommand.bind(redis)
  const patched = redis as unknown as { defineCommand: typeof redis.defineCommand }
  patched.defineCommand = (name, def) => {
    const lua = def.lua!.replace(TIME_LINES, `local now = tonumber(redis.call('GET', '${CLOCK_KEY}'))`)
    if (lua === def.lua && def.lua!.includes("redis.call('TIME')")) throw new Error(`the clock of script ${name} could not be pinned`)
    define(name, { ...def, lua })
  }
  return new RedisPool(redis, { call() {} })
}

function prng(seed: number): () => number {
  let s = seed | 0
  return () => {
    s = (s + 0x6d2b79f5) | 0
    let x = Math.imul(s ^ (s >>> 15), 1 | s)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

interface Shape {
  algorithm: Algorithm
  limit: number
  windowMs: number
  burst: number
}

t.test('MemoryPool and the Redis scripts agree on random sequences', async (t) => {
  const server = await startRedis()
  t.teardown(() => server.stop())
  const redis = server.client()
  const pool = pinnedPool(redis)
  const rnd = prng(SEED)
  const int = (a: number, b: number): number => a + Math.floor(rnd() * (b - a + 1))
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!
  const randomShape = (): Shape => {
    const algorithm = pick<Algorithm>(['fixed', 'sliding', 'token-bucket'])
    const limit = pick([1, 2, 3, 5, 10, 20, 100, 1_000, 1_000_000])
    const windowMs = pick([1_000, 2_000, 10_000, 60_000, 3_600_000, 86_400_000])
    const burst = algorithm === 'token-bucket' ? pick([1, 2, Math.max(1, Math.floor(limit / 2)), limit, limit * 3]) : limit
    return { algorithm, limit, windowMs, burst }
  }
  let now = 1_764_000_000_000 + int(0, 86_400_000)
  const memory = new MemoryPool(() => now)
  let compared = 0
  for (let run = 0; run < RUNS; run++) {
    const key = `diff:${run}`
    let shape = randomShape()
    const grants: { g: LeaseGrant; shape: Shape; holder: string }[] = []
    const sent: Giveback[] = []
    const seqs = new Map<string, number>()
    const steps: string[] = []
    const fail = (what: string): void => {
      t.fail(`${what} (POOL_DIFF_SEED=${SEED}, run ${run})`, { steps: steps.slice(-25) })
    }
    let failed = false
    for (let step = 0; step < STEPS && !failed; step++) {
      const r = rnd()
      if (r < 0.06) {
        shape = randomShape()
        steps.push(`rule ${JSON.stringify(shape)}`)
      } else if (r < 0.35) {
        const dt = pick([0, 1, 3, 50, 333, 999, 1_000, 5_000, 60_000, 3_600_000])
        now += dt
        steps.push(`+${dt} ms`)
      } else if (r < 0.55 && grants.length > 0) {
        let gb: Giveback
        if (rnd() < 0.2 && sent.length > 0) gb = pick(sent) // delivered again, unchanged
        else {
          const { g, shape: s, holder } = pick(grants)
          const seq = (seqs.get(holder) ?? 0) + int(1, 3)
          seqs.set(holder, seq)
          gb = { key, windowStart: g.windowStart, tokens: int(1, g.granted), algorithm: s.algorithm, shape: shapeOf(s.algorithm, s.limit, s.windowMs, s.burst), holder, seq }
          sent.push(gb)
        }
        steps.push(`give back ${JSON.stringify(gb)}`)
        memory.release(gb)
        await redis.set(CLOCK_KEY, String(now))
        pool.release(gb)
        await redis.ping() // the give-back has run (same connection, in order)
      } else {
        const cap = shape.algorithm === 'token-bucket' ? shape.burst : shape.limit
        const need = rnd() < 0.7 ? 1 : int(1, cap)
        const req: LeaseRequest = { key, ...shape, want: need + pick([0, 1, 16, 1_000]), need, holders: pick([1, 2, 4, 800]) }
        const a = memory.acquire(req)
        await redis.set(CLOCK_KEY, String(now))
        let b: LeaseGrant
        try {
          b = await pool.acquire(req)
        } catch (err) {
          steps.push(`acquire ${JSON.stringify(req)} -> memory ${JSON.stringify(a)}`)
          fail(`the Redis script failed: ${(err as Error).message}`)
          failed = true
          break
        }
        compared++
        steps.push(`acquire ${JSON.stringify(req)} -> memory ${JSON.stringify(a)}, redis ${JSON.stringify(b)}`)
        const same =
          a.granted === b.granted &&
          a.remaining === b.remaining &&
          a.resetMs === b.resetMs &&
          a.windowStart === b.windowStart &&
          Math.abs(a.retryMs - b.retryMs) <= 1 // float rounding of the token bucket's level (Lua's tostring)
        if (!same) {
          fail('the pools disagree')
          failed = true
        } else if (!Number.isInteger(a.remaining) || !Number.isInteger(a.granted)) {
          fail(`counts must be whole numbers (RateLimit-Remaining): ${JSON.stringify(a)}`)
          failed = true
        }
        if (a.granted > 0) grants.push({ g: a, shape, holder: pick(['h1', 'h2', 'h3']) })
      }
    }
  }
  t.ok(compared > RUNS * 10, `${compared} grants compared`)
})
