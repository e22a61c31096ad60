import t from 'tap'
import { Redis } from 'ioredis'
import type { LeaseAcquireMessage, LeaseReleaseMessage } from '../../src/messages.js'
import { LocalPool, MemoryPool, type LeasePool } from '../../src/limiter/pool.js'
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
      memory.release(msg.key, msg.windowStart, msg.tokens)
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
      const g = await pool.acquire({ key, limit: 100, windowMs: 3_600_000, want: 1 + (i % 7), holders: 2 })
      granted += g.granted
      if (g.remaining < 0 || (g.granted === 0 && g.remaining !== 0)) odd.push(`#${i}: ${JSON.stringify(g)}`)
    }
    t.equal(granted, 100, 'exactly the limit, in all')
    t.same(odd, [], 'remaining is never negative, and nothing is granted only when nothing is left')
  })

  t.test(`${name}: a grant is at most a quarter of an even share, at least 1, never more than asked`, async (t) => {
    const pool = make()
    const first = await pool.acquire({ key: `conf-${n++}`, limit: 600, windowMs: 60_000, want: 1_000, holders: 4 })
    t.equal(first.granted, 37, 'floor(600 / (4 x 4))')
    t.equal(first.remaining, 563)
    const small = await pool.acquire({ key: `conf-${n++}`, limit: 10, windowMs: 60_000, want: 1_000, holders: 4 })
    t.equal(small.granted, 1, 'a small limit is decided one at a time')
    const asked = await pool.acquire({ key: `conf-${n++}`, limit: 100_000, windowMs: 60_000, want: 5, holders: 1 })
    t.equal(asked.granted, 5)
  })

  t.test(`${name}: windows are aligned, and resetMs is what is left of the current one`, async (t) => {
    const pool = make()
    const g = await pool.acquire({ key: `conf-${n++}`, limit: 10, windowMs: 60_000, want: 1, holders: 1 })
    t.equal(g.windowStart % 60_000, 0, 'a window starts on a multiple of its length')
    t.ok(g.resetMs > 0 && g.resetMs <= 60_000)
  })

  t.test(`${name}: unused tokens go back to their window; a give-back for another window is ignored`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const g = await pool.acquire({ key, limit: 40, windowMs: 3_600_000, want: 10, holders: 1 })
    t.equal(g.granted, 10)
    pool.release(key, g.windowStart, 6)
    pool.release(key, g.windowStart - 3_600_000, 30) // a window that is over: nothing happens
    await new Promise((r) => setTimeout(r, 50)) // a release is fire-and-forget
    let more = 0
    for (let i = 0; i < 20; i++) more += (await pool.acquire({ key, limit: 40, windowMs: 3_600_000, want: 10, holders: 1 })).granted
    t.equal(more, 36, '40 - 10 + 6: the six came back, the stale give-back changed nothing')
  })
}
