import t from 'tap'
import { Redis } from 'ioredis'
import type { LeaseAcquireMessage, LeaseReleaseMessage } from '../../src/messages.js'
import { bucketSlotMs, LocalPool, MemoryPool, shapeOf, SLIDING_SLOTS, type LeasePool } from '../../src/limiter/pool.js'
import type { Algorithm, LeaseGrant, LeaseRequest } from '../../src/limiter/types.js'
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
      for (const g of msg.givebacks) memory.release(g)
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

const FIXED = { algorithm: 'fixed', burst: 1, need: 1 } as const

let seq = 0

/** Acquires until the pool grants nothing; returns the total and the last grant. */
async function drain(pool: LeasePool, req: LeaseRequest): Promise<{ total: number; last: LeaseGrant }> {
  let total = 0
  for (let i = 0; i < 1_000; i++) {
    const g = await pool.acquire(req)
    if (g.granted === 0) return { total, last: g }
    total += g.granted
  }
  throw new Error('the pool never ran out')
}
/** Gives back `tokens` of a request's bucket and window, as a holder does (a fresh sequence number unless given). */
function giveBack(pool: LeasePool, req: LeaseRequest, windowStart: number, tokens: number, at = ++seq): void {
  const shape = shapeOf(req.algorithm, req.limit, req.windowMs, req.burst)
  pool.release({ key: req.key, windowStart, tokens, algorithm: req.algorithm as Algorithm, shape, holder: 'test', seq: at })
}

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
    const req = { key, limit: 40, windowMs: 3_600_000, want: 10, holders: 1, ...FIXED }
    const g = await pool.acquire(req)
    t.equal(g.granted, 10)
    giveBack(pool, req, g.windowStart, 6)
    giveBack(pool, req, g.windowStart - 3_600_000, 30) // a window that is over: nothing happens
    await new Promise((r) => setTimeout(r, 50)) // a release is fire-and-forget
    let more = 0
    for (let i = 0; i < 20; i++) more += (await pool.acquire({ key, limit: 40, windowMs: 3_600_000, want: 10, holders: 1, ...FIXED })).granted
    t.equal(more, 36, '40 - 10 + 6: the six came back, the stale give-back changed nothing')
  })

  t.test(`${name}: a give-back delivered twice (same holder and sequence) is counted once`, async (t) => {
    const pool = make()
    const req = { key: `conf-${n++}`, limit: 10, windowMs: 3_600_000, want: 10, holders: 1, ...FIXED }
    const { total, last } = await drain(pool, req)
    t.equal(total, 10)
    const at = ++seq
    giveBack(pool, req, last.windowStart, 4, at)
    giveBack(pool, req, last.windowStart, 4, at) // as a client re-sends a command after a dropped connection
    await new Promise((r) => setTimeout(r, 50))
    t.equal((await drain(pool, req)).total, 4, 'four came back, not eight')
  })

  t.test(`${name}: a weighted request gets its whole cost or nothing, and two of cost 5 fit a limit of 10`, async (t) => {
    const pool = make()
    const req = { key: `conf-${n++}`, limit: 10, windowMs: 3_600_000, want: 5, need: 5, holders: 4, algorithm: 'fixed', burst: 10 } as const
    const grants = [(await pool.acquire(req)).granted, (await pool.acquire(req)).granted, (await pool.acquire(req)).granted]
    t.same(grants, [5, 5, 0])
  })

  t.test(`${name}: a changed rule starts from what the old one counted (a longer window does not admit twice)`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const one = { key, limit: 20, windowMs: 3_600_000, want: 20, holders: 1, ...FIXED, burst: 20 }
    t.equal((await drain(pool, one)).total, 20)
    t.equal((await pool.acquire({ ...one, windowMs: 7_200_000 })).granted, 0, 'the 20 count in the longer window')
    t.equal((await pool.acquire({ ...one, windowMs: 7_200_000, algorithm: 'sliding' })).granted, 0, 'and in a sliding window')
    t.equal((await drain(pool, { ...one, windowMs: 7_200_000, limit: 30, burst: 30 })).total, 10, 'a raised limit: the rest of it')
  })

  t.test(`${name}: sliding: the current slot and the ${SLIDING_SLOTS} before it never hold more than the limit`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const req = { key, limit: 10, windowMs: 1_000, want: 4, need: 1, holders: 1, algorithm: 'sliding', burst: 10 } as const
    let granted = 0
    const firstSlot = Date.now() - (Date.now() % 100)
    const first = await pool.acquire(req)
    granted += first.granted
    for (let i = 0; i < 10; i++) granted += (await pool.acquire(req)).granted
    t.equal(granted, 10, 'the limit, then nothing')
    t.ok(first.resetMs > 0 && first.resetMs <= 100, 'a lease lasts until the end of its slot (window / slots)')
    // Half a window later the window still holds the 10: nothing; a full window (plus a slot) later there is room.
    await new Promise((r) => setTimeout(r, 500))
    const asked = Date.now()
    const full = await pool.acquire(req)
    const answered = Date.now()
    // Room comes back when the first slot leaves the window, a slot and a window after the slot began: measured from
    // some moment between asking and the answer (the pool's own clock), whatever the machine's delays.
    const leaves = firstSlot + 100 + 1_000
    t.ok(answered >= leaves || full.granted === 0, 'half a window later: still full')
    t.ok(
      full.retryMs >= leaves - answered - 10 && full.retryMs <= leaves - asked + 10,
      `room when the first slot leaves the window (${full.retryMs} ms, between ${leaves - answered} and ${leaves - asked})`,
    )
    await new Promise((r) => setTimeout(r, 700))
    t.ok((await pool.acquire(req)).granted > 0, 'a window and a slot later: room again')
  })

  t.test(`${name}: sliding: tokens given back return to the slot they came from`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    const req = { key, limit: 40, windowMs: 60_000, want: 10, need: 1, holders: 1, algorithm: 'sliding', burst: 40 } as const
    const g = await pool.acquire(req)
    t.equal(g.granted, 10)
    giveBack(pool, req, g.windowStart, 4)
    await new Promise((r) => setTimeout(r, 50))
    let more = 0
    for (let i = 0; i < 20; i++) more += (await pool.acquire(req)).granted
    t.equal(more, 34, '40 - 10 + 4')
  })

  t.test(`${name}: token bucket: the burst at once, tokens given back while their lease lasts, never more than burst after`, async (t) => {
    const pool = make()
    const key = `conf-${n++}`
    // One token a minute: a lease slot of 500 ms, and nothing refills within the test.
    const req = { key, limit: 1, windowMs: 60_000, want: 64, need: 1, holders: 1, algorithm: 'token-bucket', burst: 40 } as const
    const slotMs = bucketSlotMs(1, 60_000, 40)
    t.equal(slotMs, 500, 'a hundredth of a token interval, at most 500 ms')
    while (Date.now() % slotMs > 100) await new Promise((r) => setTimeout(r, 5)) // early in a lease slot
    const grants: LeaseGrant[] = []
    const firstGrantAt = Date.now()
    let firstAnsweredAt = 0
    for (let i = 0; i < 40; i++) {
      const g = await pool.acquire(req)
      firstAnsweredAt ||= Date.now()
      grants.push(g)
      if (g.granted === 0) break
    }
    t.equal(grants.reduce((a, g) => a + g.granted, 0), 40, 'the burst of 40, in blocks, then nothing')
    t.equal(grants[0]!.granted, 10, 'the first block: a quarter of what is left')
    // A lease lasts until the next slot ends: granted within a slot, it has more than a slot left (unless the machine
    // stalled the call past the slot's end), and never more than two.
    const slotEnd = firstGrantAt - (firstGrantAt % slotMs) + slotMs
    const within = firstAnsweredAt < slotEnd ? slotMs : 0
    t.ok(grants[0]!.resetMs > within && grants[0]!.resetMs <= 2 * slotMs, `a lease lasts until the next slot ends (${grants[0]!.resetMs} ms)`)
    t.ok(grants.at(-1)!.retryMs >= 50_000, `a refusal says when the next token comes (${grants.at(-1)!.retryMs} ms)`)
    giveBack(pool, req, grants[0]!.windowStart, 3)
    await new Promise((r) => setTimeout(r, 50))
    let back = 0
    for (let i = 0; i < 6; i++) back += (await pool.acquire(req)).granted
    if (Date.now() - firstGrantAt < grants[0]!.resetMs) {
      t.equal(back, 3, 'the 3 given back while their lease lasted (held, not yet used), no more')
    } else {
      // The machine was so slow that the lease ended before the give-back was read: they count as used.
      t.ok(back <= 3, `a give-back read after its lease ended: ${back} of 3 came back, never more`)
    }
    await new Promise((r) => setTimeout(r, 1_100))
    let later = 0
    for (let i = 0; i < 12; i++) later += (await pool.acquire(req)).granted
    t.equal(later, 0, 'tokens whose lease ended count as used: nothing comes back but the refill')
  })
}

t.test('token bucket with a clock: the tokens a grant was asked for are used at once, its surplus is held until its lease ends', async (t) => {
  let now = 100
  const pool = new MemoryPool(() => now)
  // One token a second: lease slots of 10 ms, a lease lasting until the next slot ends.
  const one = { key: 'tb1', limit: 10, windowMs: 10_000, want: 1, need: 1, holders: 1, algorithm: 'token-bucket', burst: 1 } as const
  t.equal(bucketSlotMs(10, 10_000, 1), 10)
  t.equal(pool.acquire(one).granted, 1, 'the burst of 1, to the request that asked: used at once, not held')
  now = 105
  const empty = pool.acquire(one)
  t.equal(empty.granted, 0)
  t.equal(empty.retryMs, 995, 'the bucket refills from the grant on: the next token a second after it')
  now = 1_099
  t.equal(pool.acquire(one).granted, 0, 'not yet')
  now = 1_100
  t.equal(pool.acquire(one).granted, 1, 'a second after the grant: one token (no refill lost to a lease)')

  // A block: the surplus beyond the asking request's cost is held until its lease ends (the next slot's end).
  now = 100_000
  const block = { key: 'tb2', limit: 10, windowMs: 10_000, want: 8, need: 1, holders: 1, algorithm: 'token-bucket', burst: 40 } as const
  t.equal(pool.acquire(block).granted, 8, 'a block of 8: 1 used at once, 7 held')
  let rest = 0
  for (let i = 0; i < 40; i++) rest += pool.acquire(block).granted
  t.equal(rest, 32, 'the rest of the burst')
  now = 100_015
  t.equal(pool.acquire(block).granted, 0, 'the held tokens keep the bucket from refilling while their leases last')
  now = 110_020
  let refilled = 0
  for (let i = 0; i < 20; i++) refilled += pool.acquire(block).granted
  t.ok(refilled >= 9 && refilled <= 10, `ten seconds on, about ten tokens (${refilled}), never more than the rate and burst allow`)
})

t.test('token bucket under steady demand above the rate: the rate is sustained, never more than burst + rate x T', async (t) => {
  for (const [limit, windowMs, burst] of [[10, 1_000, 5], [2, 2_000, 1], [100, 1_000, 3], [1, 1_000, 1]] as const) {
    let now = 1_000_000
    const pool = new MemoryPool(() => now)
    const req = { key: 'steady', limit, windowMs, want: 1, need: 1, holders: 4, algorithm: 'token-bucket', burst } as const
    const times: number[] = []
    const T = 20_000
    // One request every ms, each using its token at once.
    for (let ms = 0; ms <= T; ms++, now++) if (pool.acquire(req).granted > 0) times.push(ms)
    const rate = limit / windowMs
    const ideal = burst + rate * T
    // The stated sustained rate: a grant holds the refill back for up to two lease slots, and requests come each ms.
    const sustained = rate / (1 + rate * (2 * bucketSlotMs(limit, windowMs, burst) + 1))
    t.ok(times.length >= 0.95 * (burst + sustained * T), `limit ${limit}/${windowMs} ms, burst ${burst}: ${times.length} in ${T} ms (burst + rate x T = ${ideal})`)
    let worst = 0
    for (let i = 0; i < times.length; i++) {
      for (let j = i; j < times.length; j++) worst = Math.max(worst, j - i + 1 - (burst + ((times[j]! - times[i]!) * limit) / windowMs))
    }
    t.ok(worst <= 1e-9, `no span admits more than burst + rate x span (worst excess ${worst.toFixed(3)})`)
  }
})

t.test('weighted requests: a grant is the cost or more, or nothing, whatever the number of holders', async (t) => {
  const pool = new MemoryPool(() => 5_000)
  const req = { key: 'w', limit: 10, windowMs: 3_600_000, want: 5, need: 5, holders: 800, algorithm: 'fixed', burst: 10 } as const
  t.same([pool.acquire(req).granted, pool.acquire(req).granted, pool.acquire(req).granted], [5, 5, 0], 'two of cost 5 fit a limit of 10')
  const tb = { key: 'wb', limit: 1, windowMs: 1_000, want: 70, need: 70, holders: 800, algorithm: 'token-bucket', burst: 100 } as const
  t.equal(pool.acquire(tb).granted, 70, 'a cost of 70 from a bucket of 100 over 800 holders, in one grant')
  const again = pool.acquire(tb)
  t.equal(again.granted, 0, '30 left: nothing for another 70')
  t.ok(again.retryMs > 0, `and it says when 70 may be there (${again.retryMs} ms)`)
})

t.test('a changed rule carries what the old one counted: lengthening a window does not admit twice', async (t) => {
  let now = 120_000 // the start of an even minute
  const pool = new MemoryPool(() => now)
  const oneMinute = { key: 'chg', limit: 20, windowMs: 60_000, want: 20, need: 1, holders: 1, algorithm: 'fixed', burst: 20 } as const
  let first = 0
  for (let i = 0; i < 50; i++) first += pool.acquire(oneMinute).granted
  t.equal(first, 20)
  now += 1_000
  const twoMinutes = { ...oneMinute, windowMs: 120_000, burst: 20 }
  t.equal(pool.acquire(twoMinutes).granted, 0, 'the 20 of the 1-minute window count in the new 2-minute one')
  now += 70_000
  t.equal(pool.acquire(twoMinutes).granted, 0, '70 s in: still the same 2-minute window, still full (was 20 more)')
  now = 240_000
  let fresh = 0
  for (let i = 0; i < 50; i++) fresh += pool.acquire(twoMinutes).granted
  t.equal(fresh, 20, 'the next 2-minute window starts afresh')
  const sliding = { ...twoMinutes, algorithm: 'sliding' } as const
  t.equal(pool.acquire(sliding).granted, 0, 'switching algorithm: the 20 just used are carried into the sliding window')
  const bucket = { ...oneMinute, key: 'chg2', algorithm: 'token-bucket', burst: 10 } as const
  let used = 0
  for (let i = 0; i < 6; i++) used += pool.acquire({ ...oneMinute, key: 'chg2' }).granted
  t.ok(used >= 10, `${used} used under a fixed limit of 20`)
  t.equal(pool.acquire({ ...bucket, want: 10 }).granted, 0, '10 or more used under the fixed rule: a token bucket of 10 starts empty')
})

t.test('the primary pool forgets a token bucket only once it is full again (a new one starts full)', async (t) => {
  let now = 0
  const pool = new MemoryPool(() => now)
  // 10 a minute, burst 50: empty, it takes 5 minutes to fill.
  const req = { key: 'slow', limit: 10, windowMs: 60_000, want: 50, need: 1, holders: 1, algorithm: 'token-bucket', burst: 50 } as const
  let got = 0
  for (let i = 0; i < 60; i++) got += pool.acquire(req).granted
  t.equal(got, 50)
  now = 120_000
  pool.sweep()
  t.equal(pool.size, 1, 'two windows later it is not full yet: kept')
  let after = 0
  for (let i = 0; i < 60; i++) after += pool.acquire(req).granted
  t.ok(after >= 19 && after <= 20, `what two minutes refilled, not a fresh burst (${after})`)
  now = 1_000_000
  pool.sweep()
  t.equal(pool.size, 0, 'full again: forgotten')
})
