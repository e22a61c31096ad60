import t from 'tap'
import { IDLE_RETURN_MS, LeaseTable, SWEEP_MS, type TakeItem, type TakeResult } from '../../src/limiter/leases.js'
import { grantSize, LocalPool, MemoryPool, shapeOf, type LeasePool } from '../../src/limiter/pool.js'
import type { Giveback, LeaseGrant, LeaseRequest } from '../../src/limiter/types.js'

/** Counts what a table reports. */
function events() {
  const e = { leased: 0, returned: 0 }
  return { e, sink: { leased: (n: number) => (e.leased += n), returned: (n: number) => (e.returned += n) } }
}

const item = (key: string, limit: number, windowMs = 60_000): TakeItem => ({ key, limit, windowMs, algorithm: 'fixed', burst: limit, shape: shapeOf('fixed', limit, windowMs, limit), cost: 1 })

t.test('grant sizes shrink to one request at a time as a bucket nears its limit', async (t) => {
  t.equal(grantSize(10, 100, 4), 1, 'a limit of 10 over 4 holders: one at a time')
  t.equal(grantSize(600, 1000, 4), 37, 'a per-client 600: a block of 37 to start')
  t.equal(grantSize(600, 8, 4), 8, 'never more than asked')
  t.equal(grantSize(3, 100, 1), 1)
  t.equal(grantSize(0, 100, 1), 0, 'nothing left: nothing granted')
  t.equal(grantSize(1, 100, 800), 1, 'the last token still goes to someone')
})

t.test('a request with tokens in hand is decided synchronously; the first one of a bucket waits for a lease', async (t) => {
  let now = 1_000_000
  const { e, sink } = events()
  const table = new LeaseTable(new LocalPool(new MemoryPool(() => now)), 1, sink, { now: () => now })
  const first = table.take([item('a', 1_000)])
  t.ok(first instanceof Promise, 'no tokens yet: asks the pool')
  t.match(await first, { allowed: true })
  t.equal(e.leased, 16, 'the first lease is a block of 16')
  const second = table.take([item('a', 1_000)]) as TakeResult
  t.notOk(second instanceof Promise, 'then decided from the tokens in hand')
  t.match(second, { allowed: true, remaining: 1_000 - 2 }, 'remaining: the pool left plus the tokens still in hand')
})

t.test('all-or-nothing: a request refused by one bucket takes no token of another', async (t) => {
  let now = 1_000_000
  const pool = new MemoryPool(() => now)
  const table = new LeaseTable(new LocalPool(pool), 1, events().sink, { now: () => now })
  t.match(await table.take([item('wide', 100), item('narrow', 1)]), { allowed: true })
  t.match(await table.take([item('wide', 100), item('narrow', 1)]), { allowed: false, failed: 1 })
  // 99 more fit under "wide": the refused request used none of it.
  let admitted = 0
  for (let i = 0; i < 120; i++) if ((await table.take([item('wide', 100)])).allowed) admitted++
  t.equal(admitted, 99)
})

t.test('tokens a worker stops using go back to the pool within a second', async (t) => {
  let now = 1_000_000
  const pool = new MemoryPool(() => now)
  const { e, sink } = events()
  const a = new LeaseTable(new LocalPool(pool), 2, sink, { now: () => now })
  const b = new LeaseTable(new LocalPool(pool), 2, events().sink, { now: () => now })
  // A takes 60 of 100 and then goes quiet holding the rest of its lease.
  for (let i = 0; i < 60; i++) t.ok((await a.take([item('k', 100)])).allowed)
  let bAdmitted = 0
  for (let i = 0; i < 100; i++) if ((await b.take([item('k', 100)])).allowed) bAdmitted++
  t.ok(bAdmitted < 40, `while A holds unused tokens, B gets fewer than 40 (${bAdmitted})`)
  for (let ms = 0; ms <= IDLE_RETURN_MS + SWEEP_MS; ms += SWEEP_MS) {
    now += SWEEP_MS
    a.sweep()
    b.sweep()
  }
  t.ok(e.returned > 0, 'A gave its unused tokens back')
  for (let i = 0; i < 100; i++) if ((await b.take([item('k', 100)])).allowed) bAdmitted++
  t.equal(bAdmitted, 40, 'then B admits exactly the remaining 40')
})

t.test('a lease is never used past its window: the next window starts from a fresh count', async (t) => {
  let now = 60_000 * 1_000 + 59_000 // one second before a window edge
  const pool = new MemoryPool(() => now)
  const table = new LeaseTable(new LocalPool(pool), 1, events().sink, { now: () => now })
  t.match(await table.take([item('w', 5)]), { allowed: true })
  now += 1_000 // the next window
  const r = table.take([item('w', 5)])
  t.ok(r instanceof Promise, 'the old lease is over: ask the pool again')
  t.match(await r, { allowed: true, remaining: 4 })
})

t.test('a pool that fails rejects the take (the limiter falls back), and the next take asks again', async (t) => {
  let fail = true
  const memory = new MemoryPool()
  const pool: LeasePool = {
    acquire: (req) => (fail ? Promise.reject(new Error('down')) : Promise.resolve(memory.acquire(req))),
    release: () => {},
  }
  const table = new LeaseTable(pool, 1, events().sink)
  await t.rejects(Promise.resolve(table.take([item('f', 10)])), /down/)
  fail = false
  t.match(await table.take([item('f', 10)]), { allowed: true })
})

// ---------------------------------------------------------------------------------------------------------------
// The fleet at scale, as a deterministic model: 100 instances x 8 workers, each a real LeaseTable, one pool (the
// MemoryPool, which does the same arithmetic as the Redis script) answering after a simulated round trip. No
// network and no real timers: a simulated clock advances in steps, and each step lets every pending lease resolve.

/** A seeded generator (mulberry32), so every run makes the same arrivals. */
function random(seed: number): () => number {
  let a = seed
  return () => {
    a = (a + 0x6d2b79f5) | 0
    let x = Math.imul(a ^ (a >>> 15), 1 | a)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

const INSTANCES = 100
const WORKERS = 8
const HOLDERS = INSTANCES * WORKERS
const STEP_MS = 2
const RTT_MS = 2

/** Pool calls answered RTT_MS after they were made (the pool reads its clock when it answers). */
class SimPool implements LeasePool {
  calls = 0
  readonly #due: { at: number; req: LeaseRequest; resolve: (g: LeaseGrant) => void }[] = []
  constructor(readonly memory: MemoryPool, readonly clock: () => number) {}
  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    this.calls++
    return new Promise((resolve) => this.#due.push({ at: this.clock() + RTT_MS, req, resolve }))
  }
  release(g: Giveback): void {
    this.calls++
    this.memory.release(g)
  }
  deliver(): void {
    const now = this.clock()
    while (this.#due.length > 0 && this.#due[0]!.at <= now) {
      const d = this.#due.shift()!
      d.resolve(this.memory.acquire(d.req))
    }
  }
}

/** One arrival: which worker (instance * WORKERS + worker) and which bucket. */
type Arrival = [holder: number, bucket: string]

interface SimReport {
  requests: number
  admitted: number
  worstWindow: number
  callsPerRequest: number
  /** Per bucket and window: admitted / min(limit, offered). */
  fill: number
}

async function simulate(
  limit: number,
  windowMs: number,
  durationMs: number,
  arrivals: (now: number, rnd: () => number) => Arrival[],
): Promise<SimReport & { over: string[] }> {
  let now = 10 * windowMs // window-aligned start
  const start = now
  const clock = (): number => now
  const pool = new SimPool(new MemoryPool(clock), clock)
  const tables = Array.from({ length: HOLDERS }, () => new LeaseTable(pool, HOLDERS, { leased() {}, returned() {} }, { now: clock }))
  const rnd = random(42)
  const admittedBy = new Map<string, number>()
  const offeredBy = new Map<string, number>()
  let requests = 0
  let admitted = 0
  const count = (bucket: string, at: number): void => {
    const k = `${bucket}@${Math.floor(at / windowMs)}`
    admittedBy.set(k, (admittedBy.get(k) ?? 0) + 1)
  }
  let sinceSweep = 0
  for (; now < start + durationMs; now += STEP_MS) {
    for (const [holder, bucket] of arrivals(now - start, rnd)) {
      requests++
      const k = `${bucket}@${Math.floor(now / windowMs)}`
      offeredBy.set(k, (offeredBy.get(k) ?? 0) + 1)
      const r = tables[holder]!.take([item(bucket, limit, windowMs)])
      if (!(r instanceof Promise)) {
        if (r.allowed) (admitted++, count(bucket, now))
      } else {
        void r.then((v) => {
          if (v.allowed) (admitted++, count(bucket, now))
        })
      }
    }
    pool.deliver()
    await new Promise((r) => setImmediate(r)) // every lease that resolved runs its waiters
    sinceSweep += STEP_MS
    if (sinceSweep >= SWEEP_MS) {
      sinceSweep = 0
      for (const table of tables) table.sweep()
    }
  }
  const over: string[] = []
  let worstWindow = 0
  let fillSum = 0
  for (const [k, n] of admittedBy) {
    if (n > limit) over.push(`${k}: ${n} > ${limit}`)
    worstWindow = Math.max(worstWindow, n / limit)
    fillSum += n / Math.min(limit, offeredBy.get(k) ?? n)
  }
  return { requests, admitted, worstWindow, callsPerRequest: pool.calls / requests, fill: fillSum / admittedBy.size, over }
}

const WINDOW = 2_000

t.test('simulation, 100 instances x 8 workers: no window ever admits more than the limit', async (t) => {
  const patterns: [string, number, (ms: number, rnd: () => number) => Arrival[]][] = [
    [
      'uniform: 75 req/ms spread over every worker, one shared bucket of 100,000 per window',
      100_000,
      (_ms, rnd) => Array.from({ length: 150 }, () => [Math.floor(rnd() * HOLDERS), 'all'] as Arrival),
    ],
    [
      'one hot client: half the traffic from one client on every instance, per-client limit 20,000',
      20_000,
      (_ms, rnd) =>
        Array.from({ length: 200 }, () => [Math.floor(rnd() * HOLDERS), rnd() < 0.5 ? 'hot' : `c${Math.floor(rnd() * 500)}`] as Arrival),
    ],
    [
      'a client that moves to another instance every 300 ms, limit 3,000',
      3_000,
      (ms, rnd) => {
        const instance = Math.floor(ms / 300) % INSTANCES
        return Array.from({ length: 6 }, () => [instance * WORKERS + Math.floor(rnd() * WORKERS), 'mover'] as Arrival)
      },
    ],
    [
      'a burst at each window edge (the last and first 50 ms), limit 10,000',
      10_000,
      (ms, rnd) => {
        const inWindow = ms % WINDOW
        if (inWindow > 50 && inWindow < WINDOW - 50) return []
        return Array.from({ length: 400 }, () => [Math.floor(rnd() * HOLDERS), 'edge'] as Arrival)
      },
    ],
  ]
  for (const [name, limit, arrivals] of patterns) {
    const r = await simulate(limit, WINDOW, 3 * WINDOW, arrivals)
    t.same(r.over, [], `${name}: never over the limit in any window`)
    t.ok(r.fill > 0.9, `${name}: windows filled to ${(r.fill * 100).toFixed(1)}% of min(limit, offered)`)
    t.comment(
      `${name}: ${r.requests} requests, ${r.admitted} admitted, worst window ${(r.worstWindow * 100).toFixed(1)}% of the limit, ` +
        `windows filled to ${(r.fill * 100).toFixed(1)}% of min(limit, offered), ${r.callsPerRequest.toFixed(3)} pool calls per request`,
    )
  }
})

t.test('buckets nobody uses are forgotten, so per-client rules with long windows do not grow without bound', async (t) => {
  let now = 1_000_000
  const table = new LeaseTable(new LocalPool(new MemoryPool(() => now)), 1, events().sink, { now: () => now })
  for (let i = 0; i < 50; i++) await table.take([item(`client-${i}`, 600, 3_600_000)])
  t.equal(table.size, 50)
  for (let ms = 0; ms <= 6_000; ms += SWEEP_MS) {
    now += SWEEP_MS
    table.sweep()
  }
  t.equal(table.size, 0, 'idle leases gave their tokens back and were forgotten')
})

// ---------------------------------------------------------------------------------------------------------------
// Edges: weighted requests, refusals by another bucket, a pool that stops answering, a rule that changes shape.

/** A MemoryPool that can be told to fail, recording give-backs. */
class SwitchPool implements LeasePool {
  down = false
  readonly givebacks: Giveback[] = []
  constructor(readonly memory: MemoryPool) {}
  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    return this.down ? Promise.reject(new Error('the pool did not answer')) : Promise.resolve(this.memory.acquire(req))
  }
  release(g: Giveback): void {
    this.givebacks.push(g)
    if (!this.down) this.memory.release(g)
  }
}

const weighted = (key: string, limit: number, cost: number): TakeItem => ({ ...item(key, limit, 3_600_000), cost })

t.test('concurrent weighted requests over four workers: exactly as many as the limit holds are admitted', async (t) => {
  let now = 1_000_000
  const pool = new LocalPool(new MemoryPool(() => now))
  const tables = Array.from({ length: 4 }, () => new LeaseTable(pool, 4, events().sink, { now: () => now }))
  const results = await Promise.all(tables.map((table) => table.take([weighted('c5', 10, 5)])))
  t.same(results.map((r) => r.allowed).sort(), [false, false, true, true], 'cost 5 on a limit of 10: two of four')
  const big = new LeaseTable(new LocalPool(new MemoryPool(() => now)), 800, events().sink, { now: () => now })
  t.match(await big.take([weighted('c70', 100, 70)]), { allowed: true }, 'a cost of 70 over 800 holders is admitted in one grant')
})

t.test('a request refused by one bucket gives back at once what it just leased of the others', async (t) => {
  let now = 1_000_000
  const memory = new MemoryPool(() => now)
  const pool = new SwitchPool(memory)
  const e = events()
  const table = new LeaseTable(pool, 1, e.sink, { now: () => now })
  const narrow = item('narrow-full', 1)
  t.match(await table.take([narrow]), { allowed: true })
  const r = await table.take([item('wide-fresh', 1_000), narrow])
  t.match(r, { allowed: false, failed: 1 })
  t.equal(e.e.returned, e.e.leased - 1, 'everything leased of "wide" for the refused request went back (the narrow token was used)')
  t.ok(pool.givebacks.some((g) => g.key === 'wide-fresh' && g.tokens > 0), 'given back without waiting for a sweep')
})

t.test('a pool that stops answering: workers admit only the tokens in hand (already counted), never an uncounted request', async (t) => {
  let now = 1_000_000
  const memory = new MemoryPool(() => now)
  const pool = new SwitchPool(memory)
  const tables = [0, 1].map((w) => new LeaseTable(pool, 2, events().sink, { now: () => now, offline: true, holder: `w${w}` }))
  const rule = item('stall', 50, 3_600_000)
  let admitted = 0
  for (let i = 0; i < 20; i++) if ((await tables[i % 2]!.take([rule])).allowed) admitted++
  t.equal(admitted, 20)
  pool.down = true
  let unavailable = 0
  for (let i = 0; i < 200; i++) {
    now += 5
    const r = await tables[i % 2]!.take([rule])
    if (r.allowed) admitted++
    else if (r.unavailable === true) unavailable++
  }
  t.ok(admitted <= 50, `during the stall the workers admitted ${admitted - 20} more, from tokens in hand: ${admitted} in all`)
  t.ok(unavailable > 0, `the rest were refused as unavailable (${unavailable}), not admitted uncounted`)
  pool.down = false
  now += 1_000
  for (let i = 0; i < 100; i++) if ((await tables[i % 2]!.take([rule])).allowed) admitted++
  t.equal(admitted, 50, 'back online: the window ends at exactly the limit')
})

t.test('without the offline option a pool failure rejects the take (the limiter falls back)', async (t) => {
  const pool = new SwitchPool(new MemoryPool())
  pool.down = true
  const table = new LeaseTable(pool, 1, events().sink)
  await t.rejects(Promise.resolve(table.take([item('no-offline', 10)])), /did not answer/)
})

t.test('tokens leased under a rule that changed shape are not used', async (t) => {
  let now = 1_000_000
  const table = new LeaseTable(new LocalPool(new MemoryPool(() => now)), 1, events().sink, { now: () => now })
  const before = item('shape', 1_000)
  t.match(await table.take([before]), { allowed: true })
  const after: TakeItem = { ...before, limit: 1, burst: 1, shape: shapeOf('fixed', 1, 60_000, 1) }
  const r = table.take([after])
  t.ok(r instanceof Promise, 'the tokens in hand belong to the old rule: ask the pool')
  t.match(await r, { allowed: false }, 'and the new limit of 1 is already used by the request before the change')
})

t.test('lease life runs on the table clock: a wall-clock step does not stretch a lease', async (t) => {
  let wall = 1_000_000
  let mono = 5_000
  const table = new LeaseTable(new LocalPool(new MemoryPool(() => wall)), 1, events().sink, { now: () => mono })
  t.match(await table.take([item('clock', 1_000, 1_000)]), { allowed: true })
  wall -= 3_600_000 // NTP steps the wall clock back an hour
  mono += 1_000
  t.ok(table.take([item('clock', 1_000, 1_000)]) instanceof Promise, 'a second later by the monotonic clock the lease is over')
})
