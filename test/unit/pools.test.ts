import t from 'tap'
import { Redis } from 'ioredis'
import type { LeaseAcquireMessage, LeaseReleaseMessage } from '../../src/messages.js'
import { LocalPool, MemoryPool, SLIDING_SLOTS, type LeasePool } from '../../src/limiter/pool.js'
import { PrimaryPool } from '../../src/limiter/primary-pool.js'
import { RedisPool } from '../../src/limiter/redis-pool.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'

/**
 * One conformance suite for every lease pool: the primary's memory, a worker's client of it (PrimaryPool, with the
 * IPC channel replaced by direct delivery), and Redis (a real redis-server). Each must grant within the limit, at
 * most a quarter of an even share, take back unused tokens of the current window only, and align windows.
 */

const noCalls = { call() {} }

/** A PrimaryPool whose messages reach a MemoryPool directly, as the primary would answer them. */
function primaryPool(): LeasePool {
  const memory = new MemoryPool()
  const pool: PrimaryPool = new PrimaryPool((msg: LeaseAcquireMessage | LeaseReleaseMessage) => {
    if (msg.meliproxy === 'lease-acquire') {
      const grant = memory.acquire(msg.req)
      setImmediate(() => pool.deliver({ meliproxy: 'lease-grant', id: msg.id, grant }))
    } else {
      memory.release(msg.key, msg.windowStart, msg.tokens, msg.algorithm ?? 'fixed')
    }
  })
  return pool
}

let redis: RedisProcess
let client: Redis
t.before(async () => {
  redis = await startRedis()
  client = new Redis({ port: redis.port, host: '127.0.0.1', maxRetriesPerRequest: 1 })
})
t.teardown(async () => {
  client?.disconnect()
  await redis?.stop()
})

const FIXED = { algorithm: 'fixed', burst: 1 } as const

const pools: [string, () => LeasePool][] = [
  ['memory', () => new LocalPool(new MemoryPool())],
  ['primary over IPC', primaryPool],
  ['redis', () => new RedisPool(client, noCalls)],
]

let n = 0
for (const [name, make] of pools) {
  t.test(`${name}: never grants more than the limit in a window, however it is asked`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    let granted = 0
    const odd: string[] = []
    for (let i = 0; i < 200; i++) {
      const g = await pool.acquire({ key, limit: 100, windowMs: 3_600_000, want: 1 + (i % 7), holders: 2, ...FIXED })
      granted += g.granted
      if (g.remaining < 0 || (g.granted === 0 && g.remaining !== 0)) odd.push(`#${i}: ${JSON.stringify(g)}`)
    }
    t.equal(granted, 100, 'exactly the limit, in all')
    t.same(odd, [], 'remaining is never negative, and nothing is granted only when nothing is left')
  })

  t.test(`${name}: a grant is at most a quarter of an even share, at least 1, never more than asked`, async (t) => {
    const pool = make()
    const first = await pool.acquire({ key: `conf-${n++}`, limit: 600, windowMs: 60_000, want: 1_000, holders: 4, ...FIXED })
    t.equal(first.granted, 37, 'floor(600 / (4 x 4))')
    t.equal(first.remaining, 563)
    const small = await pool.acquire({ key: `conf-${n++}`, limit: 10, windowMs: 60_000, want: 1_000, holders: 4, ...FIXED })
    t.equal(small.granted, 1, 'a small limit is decided one at a time')
    const asked = await pool.acquire({ key: `conf-${n++}`, limit: 100_000, windowMs: 60_000, want: 5, holders: 1, ...FIXED })
    t.equal(asked.granted, 5)
  })

  t.test(`${name}: windows are aligned, and resetMs is what is left of the current one`, async (t) => {
    const pool = make()
    const g = await pool.acquire({ key: `conf-${n++}`, limit: 10, windowMs: 60_000, want: 1, holders: 1, ...FIXED })
    t.equal(g.windowStart % 60_000, 0, 'a window starts on a multiple of its length')
    t.ok(g.resetMs > 0 && g.resetMs <= 60_000)
  })

  t.test(`${name}: unused tokens go back to their window; a give-back for another window is ignored`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const g = await pool.acquire({ key, limit: 40, windowMs: 3_600_000, want: 10, holders: 1, ...FIXED })
    t.equal(g.granted, 10)
    pool.release(key, g.windowStart, 6, 'fixed')
    pool.release(key, g.windowStart - 3_600_000, 30, 'fixed') // a window that is over: nothing happens
    await new Promise((r) => setTimeout(r, 50)) // a release is fire-and-forget
    let more = 0
    for (let i = 0; i < 20; i++) more += (await pool.acquire({ key, limit: 40, windowMs: 3_600_000, want: 10, holders: 1, ...FIXED })).granted
    t.equal(more, 36, '40 - 10 + 6: the six came back, the stale give-back changed nothing')
  })

  t.test(`${name}: sliding: the current slot and the ${SLIDING_SLOTS} before it never hold more than the limit`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const req = { key, limit: 10, windowMs: 2_000, want: 4, holders: 1, algorithm: 'sliding', burst: 10 } as const
    let granted = 0
    const first = await pool.acquire(req)
    granted += first.granted
    for (let i = 0; i < 10; i++) granted += (await pool.acquire(req)).granted
    t.equal(granted, 10, 'the limit, then nothing')
    t.ok(first.resetMs > 0 && first.resetMs <= 200, 'a lease lasts until the end of its slot (window / slots)')
    // A slot later the window still holds the 10: nothing; a full window (plus a slot) later there is room again.
    await new Promise((r) => setTimeout(r, 1_000))
    t.equal((await pool.acquire(req)).granted, 0, 'half a window later: still full')
    await new Promise((r) => setTimeout(r, 1_300))
    t.ok((await pool.acquire(req)).granted > 0, 'a window and a slot later: room again')
  })

  t.test(`${name}: sliding: tokens given back return to the slot they came from`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const req = { key, limit: 40, windowMs: 60_000, want: 10, holders: 1, algorithm: 'sliding', burst: 40 } as const
    const g = await pool.acquire(req)
    t.equal(g.granted, 10)
    pool.release(key, g.windowStart, 4, 'sliding')
    await new Promise((r) => setTimeout(r, 50))
    let more = 0
    for (let i = 0; i < 20; i++) more += (await pool.acquire(req)).granted
    t.equal(more, 34, '40 - 10 + 4')
  })

  t.test(`${name}: token bucket: burst at once, all or nothing, refilled at rate per window`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const req = (want: number) => ({ key, limit: 10, windowMs: 1_000, want, holders: 4, algorithm: 'token-bucket', burst: 5 }) as const
    t.equal((await pool.acquire(req(3))).granted, 3, 'a full bucket of 5 gives 3')
    const refused = await pool.acquire(req(3))
    t.equal(refused.granted, 0, '2 left: 3 is refused whole, never 2 of 3')
    t.ok(refused.resetMs >= 50 && refused.resetMs <= 110, `about 100 ms until 3 fit at 10/s (${refused.resetMs})`)
    t.equal((await pool.acquire(req(2))).granted, 2, 'the 2 left')
    await new Promise((r) => setTimeout(r, 320))
    const after = await pool.acquire(req(3))
    t.equal(after.granted, 3, 'about 3 tokens back after 300 ms at 10/s')
    pool.release(key, after.windowStart, 3, 'token-bucket')
    await new Promise((r) => setTimeout(r, 50))
    t.equal((await pool.acquire(req(3))).granted, 3, 'given back: usable again')
    await new Promise((r) => setTimeout(r, 1_000))
    t.equal((await pool.acquire(req(5))).granted, 5, 'refilled, never above the burst...')
    t.equal((await pool.acquire(req(1))).granted, 0, '...of 5')
  })
}
