import t from 'tap'
import { Redis } from 'ioredis'
import type { LeaseAcquireMessage, LeaseReleaseMessage } from '../../src/messages.js'
import { BUCKET_SLOT_MS, LocalPool, MemoryPool, SLIDING_SLOTS, type LeaseGrant, type LeasePool } from '../../src/limiter/pool.js'
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
    const req = { key, limit: 10, windowMs: 1_000, want: 4, holders: 1, algorithm: 'sliding', burst: 10 } as const
    let granted = 0
    const first = await pool.acquire(req)
    granted += first.granted
    for (let i = 0; i < 10; i++) granted += (await pool.acquire(req)).granted
    t.equal(granted, 10, 'the limit, then nothing')
    t.ok(first.resetMs > 0 && first.resetMs <= 100, 'a lease lasts until the end of its slot (window / slots)')
    // Half a window later the window still holds the 10: nothing; a full window (plus a slot) later there is room.
    await new Promise((r) => setTimeout(r, 500))
    const full = await pool.acquire(req)
    t.equal(full.granted, 0, 'half a window later: still full')
    t.ok(full.resetMs >= 350 && full.resetMs <= 750, `room in about half a window, when the first slot leaves (${full.resetMs} ms)`)
    await new Promise((r) => setTimeout(r, 700))
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

  t.test(`${name}: token bucket: the burst at once, tokens given back in their slot, never more than burst after`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const req = { key, limit: 10, windowMs: 1_000, want: 16, holders: 1, algorithm: 'token-bucket', burst: 8 } as const
    while (Date.now() % BUCKET_SLOT_MS > 500) await new Promise((r) => setTimeout(r, 20)) // early in a lease slot
    const grants: LeaseGrant[] = []
    for (let i = 0; i < 12; i++) grants.push(await pool.acquire(req))
    t.equal(grants.reduce((a, g) => a + g.granted, 0), 8, 'the burst of 8, in blocks, then nothing')
    t.ok(grants[0]!.resetMs <= BUCKET_SLOT_MS, 'a lease lasts until its slot ends')
    t.ok(grants[11]!.resetMs >= 1, 'a refusal says when to ask again')
    pool.release(key, grants[0]!.windowStart, 3, 'token-bucket')
    await new Promise((r) => setTimeout(r, 50))
    let back = 0
    for (let i = 0; i < 6; i++) back += (await pool.acquire(req)).granted
    t.equal(back, 3, 'the 3 given back in the same slot, no more: the rest is held')
    await new Promise((r) => setTimeout(r, 1_100))
    let later = 0
    for (let i = 0; i < 12; i++) later += (await pool.acquire(req)).granted
    t.ok(later >= 1 && later <= 8, `refilled after the slot, never above the burst (${later})`)
  })
}

t.test('token bucket with a clock: tokens in hand and in the bucket never exceed the burst', async (t) => {
  let now = 100
  const pool = new MemoryPool(() => now)
  const req = { key: 'tb', limit: 10, windowMs: 1_000, want: 5, holders: 1, algorithm: 'token-bucket', burst: 5 } as const
  let got = 0
  for (let i = 0; i < 5; i++) got += pool.acquire(req).granted
  t.equal(got, 5, 'the burst, held until the slot ends at 1,000')
  now = 900
  t.equal(pool.acquire(req).granted, 0, '800 ms at 10/s would refill 8, but 5 are held: the bucket stays empty')
  now = 1_000
  t.equal(pool.acquire(req).granted, 0, 'the held 5 count as used when their slot ends; the bucket starts refilling')
  now = 1_500
  let after = 0
  for (let i = 0; i < 10; i++) after += pool.acquire(req).granted
  t.equal(after, 5, 'half a second at 10/s: 5, so 999-1,500 ms admits at most 5 + 5 = burst + rate x 0.5 s')
  now = 10_000
  let full = 0
  for (let i = 0; i < 10; i++) full += pool.acquire(req).granted
  t.equal(full, 5, 'a long idle bucket holds the burst, no more')
})

t.test('the primary pool forgets a token bucket only once it is full again (a new one starts full)', async (t) => {
  let now = 0
  const pool = new MemoryPool(() => now)
  // 10 a minute, burst 50: empty, it takes 5 minutes to fill.
  const req = { key: 'slow', limit: 10, windowMs: 60_000, want: 50, holders: 1, algorithm: 'token-bucket', burst: 50 } as const
  let got = 0
  for (let i = 0; i < 60; i++) got += pool.acquire(req).granted
  t.equal(got, 50)
  now = 120_000
  pool.sweep(60_000)
  t.equal(pool.size, 1, 'two windows later it is not full yet: kept')
  let after = 0
  for (let i = 0; i < 60; i++) after += pool.acquire(req).granted
  t.ok(after >= 19 && after <= 20, `what two minutes refilled, not a fresh burst (${after})`)
  now = 1_000_000
  pool.sweep(60_000)
  t.equal(pool.size, 0, 'full again: forgotten')
})
