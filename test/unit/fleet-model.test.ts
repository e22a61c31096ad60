import fc from 'fast-check'
import t, { type Test } from 'tap'
import { LeaseTable } from '../../src/limiter/leases.js'
import { bucketSlotMs, LocalPool, MemoryPool, shapeOf } from '../../src/limiter/pool.js'
import type { Giveback, LeaseRequest } from '../../src/limiter/types.js'
import { checkerFor, itemOf, runScenario, type Burst, type Fault, type ModelPool, type Rule, type Scenario } from '../helpers/fleet-model.js'

/*
 * The randomized fleet model (issue 19, item 7). fast-check draws scenarios (rules, instances x workers, arrivals,
 * faults), runs each in test/helpers/fleet-model.ts over real LeaseTables and the MemoryPool on simulated clocks, and
 * shrinks a failing one to the smallest it can find. `npm test` runs a fixed seed (the same scenarios every time);
 * FLEET_SEED=random draws new ones, FLEET_RUNS=<n> multiplies how many. A failure prints its seed, path and test name;
 *   FLEET_SEED=<seed> FLEET_PATH=<path> npx tap test/unit/fleet-model.test.ts --grep '<name>'
 * replays exactly that scenario.
 */

/*
 * BOUNDS. Admissions are stamped with the pool's wall clock (its windows' frame); holders = instances x workers.
 * Upper, after every admission:
 * - fixed: no window admits more than `limit`; sliding: no span [s, s + W) admits more than `limit`; token bucket: no
 *   span [t1, t2] admits more than burst + rate x (t2 - t1). Exact without faults.
 * - a rule change: each admission counts against the rule it was taken under; the new rule starts with what the old
 *   one admitted in its window (fixed) or last W (sliding) current at the change, capped at the new limit (burst), as
 *   admitted in its current window or span (a token bucket carries nothing in this check: a weaker one).
 * - duplicated give-backs, a worker dying with tokens in hand: nothing more (exact).
 * - a pool stall: nothing more (exact): while the pool does not answer, workers admit only from tokens in hand, which
 *   the pool already counted, and refuse the rest as unavailable.
 * - a step of the pool's wall clock crossing j >= 1 fixed windows: (j + 1) x limit in total (a step back reopens
 *   windows, a step forward lets tokens in hand be used in the next); sliding: limit (2 x limit back); token bucket:
 *   burst (2 x burst back). The tables' leases live by their monotonic clock, so only the pool sees the step.
 * Lower, no faults, every worker sending on every route every 1-10 ms (at least twice the rule):
 * - fixed (round trip at most 1/16 of the window): every whole window admits at least
 *   limit - (holders + 1) x (cost - 1), so none refuses below that.
 * - sliding (W >= 1 s): every span of W + 2 slots admits at least floor(3/4 x limit) - holders x cost.
 * - token bucket (burst >= rate x 20 ms, lease round trip below the lease slot s = bucketSlotMs): from the start,
 *   every span T admits at least 0.95 x (burst + r' x T) - cost with r' = rate / (1 + rate x (2 s + round trip +
 *   the gap between requests)) (the stated sustained rate: the full rate where burst >= 2 keeps the held cap from
 *   binding, as README says), and no request is refused (after 500 ms) before that much was admitted.
 */

const RUNS = Number(process.env.FLEET_RUNS ?? 1)
const SEED = process.env.FLEET_SEED === 'random' ? Date.now() ^ (Math.random() * 0x7fffffff) : Number(process.env.FLEET_SEED ?? 19)
const replay = process.env.FLEET_PATH !== undefined ? { path: process.env.FLEET_PATH } : {}
const params = (numRuns: number): fc.Parameters<[Scenario]> => ({ numRuns: Math.max(1, Math.round(numRuns * RUNS)), seed: SEED, ...replay })

const WINDOWS = [100, 200, 250, 500, 1_000, 2_000] as const

/** A rule of any algorithm; cost in 1..limit (1..burst for a token bucket), shrinking towards 1. */
const ruleArb: fc.Arbitrary<Rule> = fc
  .record({
    algorithm: fc.constantFrom('fixed' as const, 'sliding' as const, 'token-bucket' as const),
    limit: fc.integer({ min: 1, max: 30 }),
    windowMs: fc.constantFrom(...WINDOWS),
    burst: fc.integer({ min: 1, max: 40 }),
    costPick: fc.nat({ max: 1_000 }),
    costOne: fc.boolean(),
  })
  .map(({ algorithm, limit, windowMs, burst, costPick, costOne }) => {
    const size = algorithm === 'token-bucket' ? burst : limit
    return { algorithm, limit, windowMs, burst: algorithm === 'token-bucket' ? burst : limit, cost: costOne ? 1 : 1 + (costPick % size) }
  })

const burstArb: fc.Arbitrary<Burst> = fc.record({
  at: fc.nat({ max: 3_000 }),
  holder: fc.nat({ max: 8 }),
  route: fc.nat({ max: 2 }),
  count: fc.integer({ min: 1, max: 30 }),
  gapMs: fc.nat({ max: 30 }),
})

const at = fc.nat({ max: 3_000 })
const faultArbs = {
  stall: fc.record({ kind: fc.constant('stall' as const), at, ms: fc.integer({ min: 10, max: 1_500 }) }),
  dup: fc.record({ kind: fc.constant('dup' as const), at, ms: fc.integer({ min: 10, max: 2_000 }), delayMs: fc.nat({ max: 50 }) }),
  death: fc.record({ kind: fc.constant('death' as const), at, holder: fc.nat({ max: 8 }), respawnMs: fc.nat({ max: 500 }) }),
  rule: fc.record({ kind: fc.constant('rule' as const), at, bucket: fc.nat({ max: 2 }), rule: ruleArb }),
  step: fc.record({ kind: fc.constant('step' as const), at, ms: fc.integer({ min: -2_000, max: 2_000 }).filter((n) => n !== 0) }),
} satisfies Record<Fault['kind'], fc.Arbitrary<Fault>>

function scenarioArb(faults: fc.Arbitrary<Fault>[], maxFaults = 3): fc.Arbitrary<Scenario> {
  return fc.record({
    instances: fc.integer({ min: 1, max: 3 }),
    workers: fc.integer({ min: 1, max: 3 }),
    rules: fc.array(ruleArb, { minLength: 1, maxLength: 3 }),
    routes: fc.array(fc.array(fc.nat({ max: 2 }), { minLength: 1, maxLength: 2 }), { minLength: 1, maxLength: 3 }),
    rttMs: fc.integer({ min: 1, max: 5 }),
    jitterMs: fc.nat({ max: 3 }),
    timeoutMs: fc.integer({ min: 50, max: 400 }),
    phaseMs: fc.nat({ max: 1_999 }),
    durationMs: fc.integer({ min: 100, max: 3_000 }),
    bursts: fc.array(burstArb, { maxLength: 25 }),
    steadyEveryMs: fc.constant(0),
    faults: faults.length === 0 ? fc.constant([]) : fc.array(fc.oneof(...faults), { minLength: 1, maxLength: maxFaults }),
    seed: fc.integer(),
  })
}

/**
 * Runs a property; passes with how many scenarios in how long, or fails with fast-check's seed, path and the
 * smallest failing scenario it shrank to, and what was violated.
 */
async function holds(t: Test, arb: fc.Arbitrary<Scenario>, runs: number, check: (s: Scenario) => Promise<string | null>): Promise<void> {
  const started = performance.now()
  let n = 0
  const r = await fc.check(
    fc.asyncProperty(arb, async (s) => {
      n++
      const v = await check(s)
      if (v !== null) throw new Error(v)
    }),
    params(runs),
  )
  const took = ((performance.now() - started) / 1000).toFixed(1)
  if (!r.failed) return void t.pass(`${n} scenarios in ${took} s (seed ${r.seed})`)
  t.fail(
    `failed after ${r.numRuns} of ${n} scenarios (${took} s): ${(r.errorInstance as Error | undefined)?.message}\n` +
      `replay: FLEET_SEED=${r.seed} FLEET_PATH=${r.counterexamplePath} npx tap test/unit/fleet-model.test.ts --grep '${t.name}'\n` +
      `smallest failing scenario (shrunk ${r.numShrinks} times): ${JSON.stringify(r.counterexample?.[0])}`,
  )
}

const upper = async (s: Scenario): Promise<string | null> => (await runScenario(s)).violation

t.test('upper bound, no faults: no window, sliding span or bucket span admits more than its rule allows', (t) =>
  holds(t, scenarioArb([]), 1_500, upper),
)
for (const kind of Object.keys(faultArbs) as Fault['kind'][]) {
  t.test(`upper bound with faults of one kind (${kind}): never beyond the rule plus that fault's stated bound`, (t) =>
    holds(t, scenarioArb([faultArbs[kind]]), 500, upper),
  )
}
t.test('upper bound with every kind of fault mixed', (t) => holds(t, scenarioArb(Object.values(faultArbs), 5), 1_000, upper))

/*
 * The lower bound: no faults, and every worker sends one request on every route every `steadyEveryMs`, so demand is
 * at least twice what a rule allows. Stranded units (leased and never used) are bounded per algorithm:
 * - fixed: each whole window admits at least limit - (holders + 1) x (cost - 1) (at the window's end each worker
 *   may hold less than one request's cost, and the pool may keep less than one), and a request refused in a window
 *   means that window reaches it.
 * - token bucket (burst >= rate x 20 ms, round trip below the slot): from the start of the load, every span T admits
 *   at least 0.95 x (burst + r' x T) - cost (r' the sustained rate above), and a request is refused only once that
 *   much was admitted (after 500 ms).
 */
const steadyArb = (algorithm: Rule['algorithm']): fc.Arbitrary<Scenario> =>
  fc
    .record({
      instances: fc.integer({ min: 1, max: 2 }),
      workers: fc.integer({ min: 1, max: 2 }),
      limit: fc.integer({ min: 1, max: 30 }),
      windowMs: algorithm === 'sliding' ? fc.constantFrom(1_000, 2_000) : fc.constantFrom(100, 200, 250, 500),
      burst: fc.integer({ min: 1, max: 40 }),
      costPick: fc.nat({ max: 1_000 }),
      costOne: fc.boolean(),
      steadyEveryMs: fc.integer({ min: 1, max: 10 }),
      rttMs: fc.integer({ min: 1, max: 5 }),
      jitterMs: fc.nat({ max: 3 }),
      phaseMs: fc.nat({ max: 1_999 }),
      windows: algorithm === 'sliding' ? fc.integer({ min: 2, max: 3 }) : fc.integer({ min: 3, max: 6 }),
      seed: fc.integer(),
    })
    .map((p): Scenario => {
      const burst = algorithm === 'token-bucket' ? Math.max(p.burst, Math.ceil((p.limit * 20) / p.windowMs)) : p.limit
      const size = algorithm === 'token-bucket' ? burst : p.limit
      const rule: Rule = { algorithm, limit: p.limit, windowMs: p.windowMs, burst, cost: p.costOne ? 1 : 1 + (p.costPick % size) }
      return {
        instances: p.instances,
        workers: p.workers,
        rules: [rule],
        routes: [[0]],
        rttMs: p.rttMs,
        jitterMs: p.jitterMs,
        timeoutMs: 400,
        phaseMs: p.phaseMs,
        durationMs: p.windows * p.windowMs,
        bursts: [],
        steadyEveryMs: p.steadyEveryMs,
        faults: [],
        seed: p.seed,
      }
    })
    .filter((s) => {
      // Demand at least twice the rule: requests per window across the fleet x cost >= 2 x limit.
      const r = s.rules[0]!
      return ((s.instances * s.workers * r.windowMs) / s.steadyEveryMs) * r.cost >= 2 * r.limit
    })

const lowerFixed = async (s: Scenario): Promise<string | null> => {
  const o = await runScenario(s)
  if (o.violation !== null) return o.violation
  const r = s.rules[0]!
  const floor = r.limit - (s.instances * s.workers + 1) * (r.cost - 1)
  const byWindow = new Map<number, number>()
  for (const st of o.stamps[0]!) byWindow.set(Math.floor(st.t / r.windowMs), (byWindow.get(Math.floor(st.t / r.windowMs)) ?? 0) + st.u)
  const first = Math.ceil(o.wallStart / r.windowMs)
  const last = Math.floor(o.wallEnd / r.windowMs) // exclusive
  for (let k = first; k < last; k++) {
    const n = byWindow.get(k) ?? 0
    if (n < floor) return `window ${k - first} of ${last - first} admitted ${n} < ${floor} (limit ${r.limit}, cost ${r.cost}, ${s.instances * s.workers} holders)`
  }
  for (const at of o.refusals[0]!) {
    const k = Math.floor(at / r.windowMs)
    if (k >= first && k < last && (byWindow.get(k) ?? 0) < floor) return `a request was refused in window ${k - first}, which admitted ${byWindow.get(k) ?? 0} < ${floor}`
  }
  return null
}

const lowerBucket = async (s: Scenario): Promise<string | null> => {
  const o = await runScenario(s)
  if (o.violation !== null) return o.violation
  const r = s.rules[0]!
  const rate = r.limit / r.windowMs
  const admittedBy = (t: number): number => o.stamps[0]!.reduce((n, st) => (st.t <= t ? n + st.u : n), 0)
  // The rate a leased bucket sustains (src/limiter/pool.ts): a grant can hold the refill back for up to two lease
  // slots, and a token that comes back waits for the next request and its round trip.
  const lag = 2 * bucketSlotMs(r.limit, r.windowMs, r.burst) + s.rttMs + s.jitterMs + s.steadyEveryMs
  const sustained = rate / (1 + rate * lag)
  // Never more than was asked for: requests come every few ms, so a big burst takes a while to ask for.
  const offeredBy = (t: number): number => admittedBy(t) + o.refusals[0]!.filter((at) => at <= t).length * r.cost
  const floorAt = (t: number): number => Math.min(offeredBy(t), 0.95 * (r.burst + sustained * (t - o.wallStart))) - r.cost
  const total = admittedBy(o.wallEnd)
  if (total < floorAt(o.wallEnd)) return `${total} admitted over ${o.wallEnd - o.wallStart} ms < ${floorAt(o.wallEnd).toFixed(1)} (burst ${r.burst}, ${r.limit}/${r.windowMs} ms, cost ${r.cost})`
  for (const at of o.refusals[0]!) {
    if (at < o.wallStart + 500 || at > o.wallEnd) continue
    const n = admittedBy(at)
    if (n < floorAt(at)) return `a request was refused at +${at - o.wallStart} ms with ${n} admitted < ${floorAt(at).toFixed(1)}`
  }
  return null
}

t.test('lower bound, fixed windows under steady load above the limit: each window admits the limit less what is stranded', (t) =>
  // The bound holds while the round trip is short next to the window: near its end a window is leased a token or two
  // per round trip, one round trip in flight per bucket and worker.
  holds(t, steadyArb('fixed').filter((s) => (s.rttMs + s.jitterMs) * 16 <= s.rules[0]!.windowMs), 300, lowerFixed),
)
t.test('lower bound, token buckets under steady load above the rate: 0.95 x (burst + sustained rate x T)', (t) =>
  // The bound holds while a lease's round trip is shorter than its slot (a lease that arrives ended is lost).
  holds(t, steadyArb('token-bucket').filter((s) => s.rttMs + s.jitterMs < bucketSlotMs(s.rules[0]!.limit, s.rules[0]!.windowMs, s.rules[0]!.burst)), 300, lowerBucket),
)

/*
 * The checks can fail: fed admissions by hand, and run against pools broken on purpose (which must be caught, and
 * shrunk to a small case).
 */
t.test('the checker flags an admission beyond each algorithm\'s bound, and only then', async (t) => {
  const fixed = checkerFor({ algorithm: 'fixed', limit: 3, windowMs: 100, burst: 3, cost: 1 })
  for (const at of [100, 150, 199, 200]) t.equal(fixed.admit(at, 1), null, `fixed: ${at} is within its window's 3`)
  t.match(fixed.admit(120, 1), /over the limit of 3 by 1/, 'a fourth in [100, 200) is caught')

  const sliding = checkerFor({ algorithm: 'sliding', limit: 2, windowMs: 100, burst: 2, cost: 1 })
  for (const at of [0, 99, 150, 199]) t.equal(sliding.admit(at, 1), null, `sliding: ${at} keeps every span [s, s + 100) at 2 or less`)
  t.match(sliding.admit(120, 1), /span of 100 ms over the sliding limit of 2 by 1/, '99, 120 and 150 lie in [99, 199)')

  const bucket = checkerFor({ algorithm: 'token-bucket', limit: 1, windowMs: 100, burst: 2, cost: 1 })
  for (const at of [0, 0, 100, 200]) t.equal(bucket.admit(at, 1), null, `token bucket: ${at} is within burst 2 + 1 per 100 ms`)
  t.match(bucket.admit(250, 1), /over burst 2/, 'a fifth by 250 ms is one more than 2 + 2.5')

  const changed = checkerFor({ algorithm: 'fixed', limit: 5, windowMs: 1_000, burst: 5, cost: 1 })
  for (let i = 0; i < 4; i++) changed.admit(1_000 + i, 1)
  changed.change({ algorithm: 'fixed', limit: 5, windowMs: 2_000, burst: 5, cost: 1 }, 1_500)
  t.equal(changed.admit(1_600, 1), null, 'a changed rule carries the old window\'s 4: a fifth fits')
  t.match(changed.admit(1_700, 1), /over the limit of 5 by 1/, 'a sixth in the new window does not')
})

/** Every give-back delivered twice, all run long. */
const dupThroughout: fc.Arbitrary<Fault> = fc.record({ kind: fc.constant('dup' as const), at: fc.constant(0), ms: fc.constant(3_000), delayMs: fc.nat({ max: 50 }) })

/** A pool that grants one token more than it counts, on every third grant. */
function overGranting(now: () => number): ModelPool {
  const m = new MemoryPool(now)
  let n = 0
  return {
    acquire(req: LeaseRequest) {
      const g = m.acquire(req)
      return g.granted > 0 && ++n % 3 === 0 ? { ...g, granted: g.granted + 1 } : g
    },
    release: (g: Giveback) => m.release(g),
  }
}

/** A pool that applies a give-back however often it comes (no (holder, seq) check), as before issue 19. */
function notIdempotent(now: () => number): ModelPool {
  const m = new MemoryPool(now)
  let seq = 0
  return { acquire: (req: LeaseRequest) => m.acquire(req), release: (g: Giveback) => m.release({ ...g, holder: 'x', seq: ++seq }) }
}

t.test('the model catches a pool that over-grants, one that applies a duplicated give-back twice, and workers that fail open', async (t) => {
  for (const [name, options, faults] of [
    ['over-granting', { makePool: overGranting }, []],
    ['non-idempotent give-backs', { makePool: notIdempotent }, [dupThroughout]],
    ['failing open in a stall', { open: true }, [faultArbs.stall]],
  ] as const) {
    const r = await fc.check(
      fc.asyncProperty(scenarioArb([...faults]), async (s) => {
        const v = (await runScenario(s, options)).violation
        if (v !== null) throw new Error(v)
      }),
      { numRuns: 2_000, seed: SEED },
    )
    t.ok(r.failed, `${name}: caught after ${r.numRuns} scenarios, shrunk ${r.numShrinks} times to ${JSON.stringify(r.counterexample?.[0])}`)
    t.match((r.errorInstance as Error | undefined)?.message, /beyond the fault allowance/, `${name}: ${(r.errorInstance as Error | undefined)?.message}`)
  }
})

t.test('a lease lives by the monotonic clock: a step back of the wall clock does not stretch it', async (t) => {
  const realNow = Date.now
  const pool = new MemoryPool(() => 1_800_000_000_000 - 40) // the pool's window of 1 s ends 40 ms from now
  const table = new LeaseTable(new LocalPool(pool), 1, { leased() {}, returned() {} })
  const item = itemOf(0, { algorithm: 'fixed', limit: 100, windowMs: 1_000, burst: 100, cost: 1 })
  t.equal(item.shape, shapeOf('fixed', 100, 1_000, 100))
  try {
    t.match(await table.take([item]), { allowed: true })
    t.notOk(table.take([item]) instanceof Promise, 'tokens in hand decide at once')
    const stepped = realNow() - 3_600_000
    Date.now = () => stepped // the wall clock steps an hour back (and stays there)
    await new Promise((r) => setTimeout(r, 60))
    t.ok(table.take([item]) instanceof Promise, 'past the lease\'s end the pool is asked again')
  } finally {
    Date.now = realNow
  }
})

const lowerSliding = async (s: Scenario): Promise<string | null> => {
  const o = await runScenario(s)
  if (o.violation !== null) return o.violation
  const r = s.rules[0]!
  const slot = r.windowMs / 10
  const span = r.windowMs + 2 * slot
  // A slot's tokens end with it: what each worker holds then (its last grant, at most max(cost, left / (4 x holders)))
  // is lost, so the fleet may strand a quarter of what was left plus a cost per worker.
  const floor = Math.floor((3 * r.limit) / 4) - s.instances * s.workers * r.cost
  for (let from = o.wallStart; from + span <= o.wallEnd; from += slot) {
    const n = o.stamps[0]!.reduce((a, st) => (st.t >= from && st.t < from + span ? a + st.u : a), 0)
    if (n < floor) return `span [+${from - o.wallStart}, +${from + span - o.wallStart}) admitted ${n} < ${floor}`
  }
  return null
}
t.test('lower bound, sliding windows (W >= 1 s) under steady load: any span of W + 2 slots admits 3/4 of the limit less a cost per worker', (t) =>
  holds(t, steadyArb('sliding'), 100, lowerSliding),
)
