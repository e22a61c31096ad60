import type { Algorithm, LeaseGrant, LeasePool } from './pool.js'

/**
 * A worker's tokens in hand, per bucket, taken from one pool (Redis, or the primary). A request whose buckets all
 * have a token in hand is decided here, synchronously, with no round trip; only a bucket that ran out asks the pool
 * again (one request in flight per bucket, however many requests wait on it).
 *
 * - All-or-nothing: a request takes one token from every bucket it draws from, or none.
 * - A lease belongs to one window of the pool's clock. It is used until `sent + resetMs` by the local clock, which is
 *   never later than the window's real end (the pool read its clock after we sent), so no token outlives its window.
 * - Tokens not needed go back at the next sweep (every SWEEP_MS): all of a lease unused for IDLE_RETURN_MS, and of one
 *   in use, whatever exceeds what it used in the last MAX_HOLD_MS. So a token never sits unneeded in one worker for
 *   more than about a second while another worker is refused.
 * - The block asked for adapts to demand: it doubles when a lease ran out within FAST_MS, halves when it lasted longer
 *   than MAX_HOLD_MS; the pool caps it by what is left and how many holders share it (see grantSize).
 * - A request may use several units of a bucket (its rule's cost): it takes them all, or none.
 * - Every algorithm leases the same way (src/limiter/pool.ts): a lease belongs to a window, a sliding window's slot
 *   or a token bucket's slot, and ends with it.
 */

/** One bucket a request draws from. */
export interface TakeItem {
  readonly key: string
  readonly limit: number
  readonly windowMs: number
  readonly algorithm: Algorithm
  readonly burst: number
  /** Units this request uses. */
  readonly cost: number
}

/** The outcome of a take. */
export type TakeResult =
  | {
      readonly allowed: true
      /** Index of the bucket nearest exhaustion (the fewest units left). */
      readonly nearest: number
      /** Its units left after this request: the pool's remaining plus the tokens in hand. */
      readonly remaining: number
      /** Milliseconds until its window ends. */
      readonly resetMs: number
    }
  | {
      readonly allowed: false
      /** Index of the first full bucket. */
      readonly failed: number
      /** Milliseconds until that bucket's window ends. */
      readonly resetMs: number
      /** Refused because the bucket cannot be counted (a whenRedisDown: deny rule while Redis is unusable). */
      readonly unavailable?: true
    }

export const SWEEP_MS = 100
export const IDLE_RETURN_MS = 400
export const MAX_HOLD_MS = 1_000
const FAST_MS = 1_000
const FIRST_WANT = 16
const MAX_WANT = 16_384
/** After the pool said "exhausted", requests are refused locally this long before the pool is asked again. */
const EXHAUSTED_RECHECK_MS = 200
/** A bucket nobody asked for this long is forgotten. */
const FORGET_MS = 5_000
/** A request that lost the race for freshly granted tokens this many times is refused (contention, not a limit). */
const MAX_ATTEMPTS = 64

interface Lease {
  tokens: number
  windowStart: number
  /** Local time after which the lease's window may be over. */
  expiresAt: number
  poolRemaining: number
  grantedAt: number
  lastUsed: number
  /** Start of the current hold period, and the tokens used in it. */
  periodStart: number
  periodUsed: number
  want: number
  exhaustedUntil: number
  refill: Promise<void> | null
  waiting: number
  algorithm: Algorithm
}

/** What a lease table reports (the limiter's metrics). */
export interface LeaseEvents {
  leased(tokens: number): void
  returned(tokens: number): void
}

/** A worker's leases from one pool. */
export class LeaseTable {
  readonly #pool: LeasePool
  readonly #holders: number
  readonly #events: LeaseEvents
  readonly #now: () => number
  readonly #leases = new Map<string, Lease>()
  /** The leases of the take being decided (takeLocal is synchronous, so one array serves every take). */
  readonly #scratch: Lease[] = []

  constructor(pool: LeasePool, holders: number, events: LeaseEvents, now: () => number = Date.now) {
    this.#pool = pool
    this.#holders = Math.max(1, holders)
    this.#events = events
    this.#now = now
  }

  /** Decides a request: synchronously when every bucket has a token in hand (or one is known full). */
  take(items: readonly TakeItem[]): TakeResult | Promise<TakeResult> {
    return this.takeLocal(items) ?? this.#takeSlow(items)
  }

  /** Decides from what is in hand only; null when some bucket needs the pool. Never calls the pool. */
  takeLocal(items: readonly TakeItem[]): TakeResult | null {
    const now = this.#now()
    const found = this.#scratch
    let missing = false
    for (let i = 0; i < items.length; i++) {
      const it = items[i]!
      const l = this.#leases.get(it.key)
      if (l === undefined || l.expiresAt <= now) {
        missing = true
      } else if (l.tokens < it.cost) {
        if (l.exhaustedUntil > now) return { allowed: false, failed: i, resetMs: l.expiresAt - now }
        missing = true
      } else {
        found[i] = l
      }
    }
    if (missing) return null
    // Every bucket holds enough: each gives up the request's cost.
    let nearest = 0
    let least = Infinity
    let resetMs = 0
    for (let i = 0; i < items.length; i++) {
      const l = found[i]!
      const cost = items[i]!.cost
      l.tokens -= cost
      l.lastUsed = now
      l.periodUsed += cost
      const left = l.poolRemaining + l.tokens
      if (left < least) {
        least = left
        nearest = i
        resetMs = l.expiresAt - now
      }
    }
    return { allowed: true, nearest, remaining: least, resetMs }
  }

  /** Refills every bucket that needs it, then decides; rejects when the pool does (the caller falls back). */
  async #takeSlow(items: readonly TakeItem[]): Promise<TakeResult> {
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
      const now = this.#now()
      const refills: Promise<void>[] = []
      for (const it of items) {
        const l = this.#lease(it.key, now)
        if (l.tokens >= it.cost && l.expiresAt > now) continue
        if (l.exhaustedUntil > now) continue
        refills.push(this.#refill(l, it, now))
      }
      if (refills.length > 0) await Promise.all(refills)
      const result = this.takeLocal(items)
      if (result !== null) return result
    }
    return { allowed: false, failed: 0, resetMs: EXHAUSTED_RECHECK_MS }
  }

  #lease(key: string, now: number): Lease {
    let l = this.#leases.get(key)
    if (l === undefined) {
      l = {
        tokens: 0,
        windowStart: -1,
        expiresAt: 0,
        poolRemaining: 0,
        grantedAt: now,
        lastUsed: now,
        periodStart: now,
        periodUsed: 0,
        want: FIRST_WANT,
        exhaustedUntil: 0,
        refill: null,
        waiting: 0,
        algorithm: 'fixed',
      }
      this.#leases.set(key, l)
    } else if (l.expiresAt <= now) {
      l.tokens = 0 // the window is over: what was left of it is worth nothing (and counted nowhere new)
      l.exhaustedUntil = 0
    }
    return l
  }

  /** One pool request per bucket at a time; everyone who needs the bucket meanwhile waits on the same one. */
  #refill(l: Lease, it: TakeItem, now: number): Promise<void> {
    l.waiting++
    if (l.refill !== null) return l.refill
    if (l.windowStart >= 0 && l.expiresAt > now) {
      const lasted = now - l.grantedAt
      if (lasted < FAST_MS) l.want = Math.min(MAX_WANT, l.want * 2)
      else if (lasted > MAX_HOLD_MS) l.want = Math.max(1, l.want >> 1)
    }
    const sent = now
    const want = Math.max(l.want, l.waiting, it.cost)
    l.algorithm = it.algorithm
    const req = { key: it.key, limit: it.limit, windowMs: it.windowMs, want, holders: this.#holders, algorithm: it.algorithm, burst: it.burst }
    l.refill = this.#pool.acquire(req).then(
      (g) => this.#granted(l, g, sent),
      (err: unknown) => {
        l.refill = null
        l.waiting = 0
        throw err
      },
    )
    return l.refill
  }

  #granted(l: Lease, g: LeaseGrant, sent: number): void {
    const now = this.#now()
    l.refill = null
    l.waiting = 0
    // Tokens of an earlier window are no use in this one.
    if (g.windowStart !== l.windowStart) l.tokens = 0
    // Nothing granted: resetMs says when to ask again, which must not stretch the life of tokens still in hand.
    const expiresAt = sent + g.resetMs
    l.expiresAt = g.granted === 0 && l.tokens > 0 ? Math.min(l.expiresAt, expiresAt) : expiresAt
    l.tokens += g.granted
    l.windowStart = g.windowStart
    l.poolRemaining = g.remaining
    l.grantedAt = now
    l.lastUsed = now
    if (l.tokens === g.granted) {
      l.periodStart = now
      l.periodUsed = 0
    }
    l.exhaustedUntil = g.granted === 0 ? Math.min(l.expiresAt, now + EXHAUSTED_RECHECK_MS) : 0
    if (g.granted > 0) this.#events.leased(g.granted)
  }

  /** Gives back tokens not needed any more and forgets idle buckets (the caller runs it every SWEEP_MS). */
  sweep(): void {
    const now = this.#now()
    for (const [key, l] of this.#leases) {
      if (l.refill !== null) continue
      if (l.expiresAt <= now) {
        if (now - l.lastUsed >= FORGET_MS) this.#leases.delete(key)
        else l.tokens = 0
        continue
      }
      if (l.tokens === 0) {
        // Nothing in hand: forget a bucket unused for a while (a per-client rule with a long window would otherwise
        // keep one entry per client until the window ends).
        if (now - l.lastUsed >= FORGET_MS && l.exhaustedUntil <= now) this.#leases.delete(key)
        continue
      }
      if (now - l.lastUsed >= IDLE_RETURN_MS) {
        this.#release(key, l, l.tokens)
      } else if (now - l.periodStart >= MAX_HOLD_MS) {
        // Still in use, but holding more than a hold period's worth: the excess goes back, the rest is needed.
        const excess = l.tokens - l.periodUsed
        if (excess > 0) {
          this.#release(key, l, excess)
          l.want = Math.max(1, l.want >> 1)
        }
        l.periodStart = now
        l.periodUsed = 0
      }
    }
  }

  #release(key: string, l: Lease, tokens: number): void {
    this.#pool.release(key, l.windowStart, tokens, l.algorithm)
    this.#events.returned(tokens)
    l.poolRemaining += tokens
    l.tokens -= tokens
  }

  /** Drops the leases of one bucket, or of every bucket of a rule (their pool count was reset). */
  forget(rule: string, bucket: string | null, prefix = ''): void {
    for (const key of this.#leases.keys()) {
      const k = key.startsWith(prefix) ? key.slice(prefix.length) : key
      if (bucket !== null ? k === bucket : k === rule || k.startsWith(rule + '|')) this.#leases.delete(key)
    }
  }

  /** Forgets which buckets the pool called full (a new rule set may have raised their limits). */
  clearExhausted(): void {
    for (const l of this.#leases.values()) l.exhaustedUntil = 0
  }

  /** Gives every unused token back (a worker about to exit). */
  releaseAll(): void {
    const now = this.#now()
    for (const [key, l] of this.#leases) {
      if (l.tokens > 0 && l.expiresAt > now) {
        this.#pool.release(key, l.windowStart, l.tokens, l.algorithm)
        this.#events.returned(l.tokens)
      }
    }
    this.#leases.clear()
  }

  /** How many buckets this table tracks. */
  get size(): number {
    return this.#leases.size
  }
}
