import { LeaseTable, SWEEP_MS, type TakeItem, type TakeResult } from '../../src/limiter/leases.js'
import { MemoryPool, shapeOf, type LeasePool } from '../../src/limiter/pool.js'
import type { Algorithm, LeaseGrant, LeaseRequest } from '../../src/limiter/types.js'

/**
 * A randomized fleet model (issue 19, item 7): instances x workers, each a real LeaseTable, over one shared pool (the
 * MemoryPool, which does the arithmetic of the Redis scripts), on simulated clocks: the pool reads a wall clock that
 * can step; the tables read a monotonic clock. The pool answers after a simulated round trip. No real timers, no
 * network: time advances 1 ms per tick, and every tick in which something happened drains the promise queue.
 *
 * A BucketCheck per bucket watches every admission and stops the run at the first one beyond the bounds (BOUNDS
 * in test/unit/fleet-model.test.ts says them in prose).
 */

/** One bucket's rule (a TakeItem without its key). */
export interface Rule {
  readonly algorithm: Algorithm
  /** Units per window (token bucket: the refill per window). */
  readonly limit: number
  readonly windowMs: number
  /** Token bucket: its size; otherwise equal to the limit. */
  readonly burst: number
  /** Units one request uses. */
  readonly cost: number
}

/** A fault injected at `at` ms into the run. */
export type Fault =
  /** The pool answers nothing for `ms`: acquires wait, then are answered or time out; releases wait. */
  | { readonly kind: 'stall'; readonly at: number; readonly ms: number }
  /** For `ms`, every give-back reaches the pool twice (the second `delayMs` later: a re-send after a reconnect). */
  | { readonly kind: 'dup'; readonly at: number; readonly ms: number; readonly delayMs: number }
  /** A worker dies holding its tokens (its table dropped, nothing given back); a new one starts `respawnMs` later. */
  | { readonly kind: 'death'; readonly at: number; readonly holder: number; readonly respawnMs: number }
  /** The rule of one bucket key changes (limit, window, algorithm, burst, cost). */
  | { readonly kind: 'rule'; readonly at: number; readonly bucket: number; readonly rule: Rule }
  /** The pool's wall clock steps by `ms` (either way); the tables' monotonic clock does not. */
  | { readonly kind: 'step'; readonly at: number; readonly ms: number }

/** `count` requests from one worker on one route, `gapMs` apart, starting at `at`. */
export interface Burst {
  readonly at: number
  readonly holder: number
  readonly route: number
  readonly count: number
  readonly gapMs: number
}

/** One run. Indices (holder, route, bucket) are taken modulo what exists, so shrinking never makes one invalid. */
export interface Scenario {
  readonly instances: number
  readonly workers: number
  /** One rule per bucket key (b0, b1, ...). */
  readonly rules: readonly Rule[]
  /** Which buckets a request draws from (all of them, or none). */
  readonly routes: readonly (readonly number[])[]
  readonly rttMs: number
  readonly jitterMs: number
  /** How long a worker waits for the pool before the acquire fails (PrimaryPool's reply timeout). */
  readonly timeoutMs: number
  /** The wall clock at the start, modulo 2 s (windows are not aligned with the run). */
  readonly phaseMs: number
  readonly durationMs: number
  readonly bursts: readonly Burst[]
  /** Steady load: every live worker sends one request on every route every `steadyEveryMs` (0: none). */
  readonly steadyEveryMs: number
  readonly faults: readonly Fault[]
  readonly seed: number
}

/** What the pool does; a MemoryPool, or a deliberately broken one to show the checker catches it. */
export interface ModelPool {
  acquire(req: LeaseRequest): LeaseGrant
  release(...args: Parameters<LeasePool['release']>): void
}

/** An admission as the checker saw it. */
export interface Stamp {
  readonly t: number
  readonly u: number
}

/** The result of a run. */
export interface Outcome {
  /** The first admission beyond the bounds, or null. */
  readonly violation: string | null
  readonly requests: number
  readonly admitted: number
  readonly refused: number
  /** Requests let through uncounted because the pool failed (what src/pipeline/limit.ts does on a rejected take). */
  readonly failedOpen: number
  /** Wall-clock admissions per bucket (bucket index -> stamps in order), for the lower-bound checks. */
  readonly stamps: readonly Stamp[][]
  /** Wall-clock times of refusals per bucket (the bucket that refused). */
  readonly refusals: readonly number[][]
  /** Wall clock at the start and at the end of the arrivals. */
  readonly wallStart: number
  readonly wallEnd: number
}

const MONO_START = 50_000_000
/** A multiple of every window the model uses, so phaseMs alone decides the alignment. */
const WALL_START = 1_800_000_000_000

/** A seeded generator (mulberry32). */
export function random(seed: number): () => number {
  let a = seed | 0
  return () => {
    a = (a + 0x6d2b79f5) | 0
    let x = Math.imul(a ^ (a >>> 15), 1 | a)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

/**
 * A worker's table, as the primary's pool is used: never open (a pool that fails or does not answer leaves the worker
 * deciding from its tokens in hand), a holder id per worker life, the simulated monotonic clock.
 */
function makeTable(p: LeasePool, holders: number, holder: string, now: () => number, open: boolean): LeaseTable {
  return new LeaseTable(p, holders, { leased() {}, returned() {} }, { offline: !open, holder, now })
}

const shapeOfRule = (r: Rule): string => shapeOf(r.algorithm, r.limit, r.windowMs, r.burst)

/** The TakeItem of bucket `b` under `rule`. */
export function itemOf(b: number, rule: Rule): TakeItem {
  return { key: `b${b}`, limit: rule.limit, windowMs: rule.windowMs, algorithm: rule.algorithm, burst: rule.burst, shape: shapeOfRule(rule), cost: rule.cost }
}


/** The checks of one rule of one bucket, from the moment it took effect (an epoch). */
class Epoch {
  readonly rule: Rule
  #windows = new Map<number, number>()
  #excessSum = 0
  readonly #stamps: Stamp[] = []
  /** Every admission of the epoch, fixed windows included. */
  readonly #all: Stamp[] = []

  constructor(rule: Rule) {
    this.rule = rule
  }

  /** The admissions of this epoch in its window (fixed) or span (sliding: the last W) current at wall time w. */
  current(w: number): Stamp[] {
    const r = this.rule
    if (r.algorithm === 'fixed') {
      const k = Math.floor(w / r.windowMs)
      return this.#all.filter((s) => Math.floor(s.t / r.windowMs) === k && s.t <= w)
    }
    if (r.algorithm === 'sliding') return this.#all.filter((s) => s.t > w - r.windowMs && s.t <= w)
    return [] // a token bucket's carried state is not derived from admissions (a weaker check, stated)
  }

  /** Adds units at wall time t; returns the epoch's excess (fixed: summed over windows; else the worst span's). */
  add(t: number, u: number): number {
    this.#all.push({ t, u })
    const r = this.rule
    if (r.algorithm === 'fixed') {
      const k = Math.floor(t / r.windowMs)
      const before = this.#windows.get(k) ?? 0
      this.#windows.set(k, before + u)
      this.#excessSum += Math.max(0, before + u - r.limit) - Math.max(0, before - r.limit)
      return this.#excessSum
    }
    const st = this.#stamps
    let i = st.length
    while (i > 0 && st[i - 1]!.t > t) i--
    if (i > 0 && st[i - 1]!.t === t) st[i - 1] = { t, u: st[i - 1]!.u + u }
    else st.splice(i, 0, { t, u })
    if (r.algorithm === 'sliding') {
      // The worst span [s, s + W) holding t starts at a stamp in (t - W, t].
      let worst = 0
      let hi = 0
      let sum = 0
      for (let lo = 0; lo < st.length; lo++) {
        if (st[lo]!.t > t) break
        while (hi < st.length && st[hi]!.t < st[lo]!.t + r.windowMs) sum += st[hi++]!.u
        if (st[lo]!.t > t - r.windowMs) worst = Math.max(worst, sum)
        sum -= st[lo]!.u
      }
      return Math.max(0, worst - r.limit)
    }
    // Token bucket: the worst closed span [t_i, t_j] by units - rate x (t_j - t_i), over all spans (O(n)).
    const rate = r.limit / r.windowMs
    let worst = -Infinity
    let best = -Infinity // max over i <= j of (-units before i + rate x t_i)
    let prefix = 0
    for (const s of st) {
      best = Math.max(best, -prefix + rate * s.t)
      prefix += s.u
      worst = Math.max(worst, prefix - rate * s.t + best)
    }
    return Math.max(0, worst - r.burst)
  }
}

/**
 * Bounds of one bucket. Admissions are stamped with the pool's wall clock (the frame its windows live in) and checked
 * against the rule they were taken under: each rule change starts an epoch, and what the old rule admitted in its
 * window or span current at the change is carried in at the times it was admitted (capped at the new limit or
 * burst). `allowance` sums what the faults so far may add (clock steps).
 */
class BucketCheck {
  allowance = 0
  readonly all: Stamp[] = []
  readonly epochs: Epoch[]

  constructor(rule: Rule) {
    this.epochs = [new Epoch(rule)]
  }

  get rule(): Rule {
    return this.epochs.at(-1)!.rule
  }

  /**
   * The rule changes at wall time w. The pool converts a bucket when the first request under the new rule reaches it,
   * carrying what the old rule still counts then; so the new epoch takes, at its first admission t, what the old rule
   * admitted in its window or span current at t, at the times it was admitted (the latest first, up to the new limit
   * or burst): the new rule's windows and spans count it where it happened.
   */
  change(rule: Rule, w: number): void {
    void w
    this.#carryFrom = this.epochs.at(-1)!
    this.epochs.push(new Epoch(rule))
  }

  /** The epoch whose admissions the latest one has yet to take over (at its first admission). */
  #carryFrom: Epoch | null = null

  #carry(t: number): void {
    const from = this.#carryFrom
    this.#carryFrom = null
    if (from === null) return
    const e = this.epochs.at(-1)!
    const cap = e.rule.algorithm === 'token-bucket' ? e.rule.burst : e.rule.limit
    let carried = 0
    for (const st of from.current(t).sort((a, b) => b.t - a.t)) {
      if (carried >= cap) break
      const u = Math.min(st.u, cap - carried)
      e.add(st.t, u)
      carried += u
    }
  }

  /** Records an admission under epoch `epoch`; returns a description when it goes beyond the bounds. */
  admit(t: number, u: number, epoch = this.epochs.length - 1): string | null {
    if (epoch === this.epochs.length - 1) this.#carry(t)
    this.all.push({ t, u })
    const e = this.epochs[epoch]!
    const excess = e.add(t, u)
    if (excess > this.allowance + 1e-9) {
      const r = e.rule
      const what =
        r.algorithm === 'fixed'
          ? `fixed windows of ${r.windowMs} ms over the limit of ${r.limit} by ${excess} in total`
          : r.algorithm === 'sliding'
            ? `a span of ${r.windowMs} ms over the sliding limit of ${r.limit} by ${excess}`
            : `a span over burst ${r.burst} + ${r.limit}/${r.windowMs} ms x T by ${excess.toFixed(2)}`
      return `${what} (rule ${epoch} of this bucket), beyond the fault allowance of ${this.allowance}`
    }
    return null
  }
}

/** How to run: `makePool` replaces the MemoryPool (e.g. with a broken one); `open` builds tables that fail open. */
export interface RunOptions {
  readonly makePool?: (now: () => number) => ModelPool
  /** Tables that fail open: a failed acquire rejects the take, and the request goes through uncounted. */
  readonly open?: boolean
}

/** Runs one scenario. */
export async function runScenario(s: Scenario, options: RunOptions = {}): Promise<Outcome> {
  const { makePool, open = false } = options
  const H = s.instances * s.workers
  const rnd = random(s.seed)
  let mono = MONO_START
  let wallOffset = WALL_START + s.phaseMs - MONO_START
  const monoNow = (): number => mono
  const wall = (): number => mono + wallOffset
  const memory: ModelPool = makePool?.(wall) ?? new MemoryPool(wall)

  const rules = s.rules.map((r) => r)
  const checks = rules.map((r) => new BucketCheck(r))
  let violation: string | null = null
  const refusals: number[][] = rules.map(() => [])
  let requests = 0
  let admitted = 0
  let refused = 0
  let failedOpen = 0

  // Pool operations in flight: applied at `at` (ms since start), in order, unless the pool is stalled.
  interface Op {
    at: number
    seq: number
    run: () => void
  }
  const ops: Op[] = []
  let seq = 0
  const schedule = (at: number, run: () => void): void => {
    const op = { at, seq: seq++, run }
    let i = ops.length
    while (i > 0 && (ops[i - 1]!.at > at || (ops[i - 1]!.at === at && ops[i - 1]!.seq > op.seq))) i--
    ops.splice(i, 0, op)
  }
  const timers: { at: number; fire: () => void }[] = []
  const latency = (): number => s.rttMs + Math.floor(rnd() * (s.jitterMs + 1))
  let tick = 0
  let stalledUntil = -1
  let dupUntil = -1
  let dupDelay = 0
  class HolderPool implements LeasePool {
    constructor(readonly holder: number, readonly gen: number) {}
    acquire(req: LeaseRequest): Promise<LeaseGrant> {
      return new Promise((resolve, reject) => {
        let settled = false
        timers.push({
          at: tick + s.timeoutMs,
          fire: () => {
            if (settled) return
            settled = true
            reject(new Error(`the pool did not answer within ${s.timeoutMs} ms`))
          },
        })
        schedule(tick + latency(), () => {
          const g = memory.acquire(req) // applied even when nobody waits for it any more (as the primary and Redis do)
          if (settled) return
          settled = true
          resolve(g)
        })
      })
    }
    release(...args: Parameters<LeasePool['release']>): void {
      const at = tick + latency()
      schedule(at, () => memory.release(...args))
      if (tick < dupUntil) schedule(at + dupDelay, () => memory.release(...args))
    }
  }

  const workers = Array.from({ length: H }, (_, h) => ({ gen: 0, table: makeTable(new HolderPool(h, 0), H, `h${h}.0`, monoNow, open) as LeaseTable | null }))

  const flush = (): Promise<void> => new Promise((r) => setImmediate(r))

  const decide = (route: readonly number[], items: readonly TakeItem[], epochs: readonly number[], r: TakeResult | 'open'): void => {
    if (r === 'open' || r.allowed) {
      admitted++
      if (r === 'open') failedOpen++
      const w = wall()
      for (let i = 0; i < route.length && violation === null; i++) {
        const b = route[i]!
        const v = checks[b]!.admit(w, items[i]!.cost, epochs[i])
        if (v !== null) violation = `bucket b${b} at +${tick} ms (wall ${w}): ${v}`
      }
    } else {
      refused++
      refusals[route[r.failed]!]!.push(wall())
    }
  }

  // Arrivals, in time order.
  const routes = (s.routes.length > 0 ? s.routes : [[0]]).map((r) => [...new Set(r.map((b) => b % rules.length))])
  const arrivals: { at: number; holder: number; route: number }[] = []
  for (const b of s.bursts) {
    for (let k = 0; k < b.count; k++) {
      const at = b.at + k * b.gapMs
      if (at < s.durationMs) arrivals.push({ at, holder: b.holder % H, route: b.route % routes.length })
    }
  }
  if (s.steadyEveryMs > 0) {
    for (let at = 0; at < s.durationMs; at += s.steadyEveryMs) {
      for (let h = 0; h < H; h++) for (let r = 0; r < routes.length; r++) arrivals.push({ at, holder: h, route: r })
    }
  }
  arrivals.sort((a, b) => a.at - b.at)
  const faults = [...s.faults].sort((a, b) => a.at - b.at)
  const respawns: { at: number; holder: number }[] = []

  let maxStall = 0
  for (const f of faults) if (f.kind === 'stall') maxStall = Math.max(maxStall, f.ms)
  const end = s.durationMs + s.timeoutMs + maxStall + 2 * SWEEP_MS
  const wallStart = wall()
  let wallEnd = wallStart
  let ai = 0
  let fi = 0

  for (tick = 0; tick <= end && violation === null; tick++) {
    mono = MONO_START + tick
    if (tick === s.durationMs) wallEnd = wall()
    let busy = false

    for (; fi < faults.length && faults[fi]!.at <= tick; fi++) {
      const f = faults[fi]!
      if (f.kind === 'stall') {
        stalledUntil = Math.max(stalledUntil, tick + f.ms) // adds nothing to any bound (tokens in hand only)
      } else if (f.kind === 'dup') {
        dupUntil = Math.max(dupUntil, tick + f.ms)
        dupDelay = f.delayMs
      } else if (f.kind === 'death') {
        const h = f.holder % H
        if (workers[h]!.table !== null) {
          workers[h]!.table = null
          workers[h]!.gen++
          respawns.push({ at: tick + f.respawnMs, holder: h })
        }
      } else if (f.kind === 'rule') {
        const b = f.bucket % rules.length
        rules[b] = f.rule
        checks[b]!.change(f.rule, wall())
        for (const w of workers) (w.table as { clearExhausted?: () => void } | null)?.clearExhausted?.()
      } else {
        const before = wall()
        wallOffset += f.ms
        step(before, wall())
      }
    }
    for (let i = 0; i < respawns.length; i++) {
      const r = respawns[i]!
      if (r.at > tick) continue
      respawns.splice(i--, 1)
      const w = workers[r.holder]!
      w.gen++
      w.table = makeTable(new HolderPool(r.holder, w.gen), H, `h${r.holder}.${w.gen}`, monoNow, open)
    }

    for (let i = 0; i < timers.length; i++) {
      if (timers[i]!.at > tick) continue
      timers[i]!.fire()
      timers.splice(i--, 1)
      busy = true
    }
    if (tick >= stalledUntil) {
      while (ops.length > 0 && ops[0]!.at <= tick) {
        ops.shift()!.run()
        busy = true
      }
    }
    if (busy) await flush()

    for (; ai < arrivals.length && arrivals[ai]!.at <= tick; ai++) {
      const a = arrivals[ai]!
      const w = workers[a.holder]!
      if (w.table === null) continue // nobody there to take it
      requests++
      busy = true
      const route = routes[a.route]!
      const items = route.map((b) => itemOf(b, rules[b]!))
      const epochs = route.map((b) => checks[b]!.epochs.length - 1)
      const gen = w.gen
      const r = w.table.take(items)
      if (!(r instanceof Promise)) decide(route, items, epochs, r)
      else {
        r.then(
          (v) => {
            if (workers[a.holder]!.gen === gen) decide(route, items, epochs, v)
          },
          () => {
            // What src/pipeline/limit.ts does with a take that rejects: the request goes through, counted nowhere.
            if (workers[a.holder]!.gen === gen) decide(route, items, epochs, 'open')
          },
        )
      }
    }
    if ((tick + 1) % SWEEP_MS === 0) for (const w of workers) w.table?.sweep()
    if (busy) await flush()
  }

  /** The wall clock stepped: each bucket may admit more, as README states per algorithm. */
  function step(before: number, after: number): void {
    for (let b = 0; b < rules.length; b++) {
      const r = rules[b]!
      const back = after < before
      if (r.algorithm === 'fixed') {
        const crossed = Math.abs(Math.floor(after / r.windowMs) - Math.floor(before / r.windowMs))
        checks[b]!.allowance += crossed === 0 ? 0 : (crossed + 1) * r.limit
      } else if (r.algorithm === 'sliding') checks[b]!.allowance += (back ? 2 : 1) * r.limit
      else checks[b]!.allowance += (back ? 2 : 1) * r.burst
    }
  }

  return { violation, requests, admitted, refused, failedOpen, stamps: checks.map((c) => c.all), refusals, wallStart, wallEnd }
}

/** The checker alone, for tests that feed it admissions directly. */
export function checkerFor(rule: Rule): { admit(t: number, u: number): string | null; change(rule: Rule, t: number): void } {
  const c = new BucketCheck(rule)
  return { admit: (t, u) => c.admit(t, u), change: (r, t) => c.change(r, t) }
}
