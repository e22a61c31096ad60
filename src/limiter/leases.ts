import { randomUUID } from 'node:crypto'
import { ExpiryWheel } from './expiry.js'
import type { LeasePool } from './pool.js'
import type { Algorithm, LeaseGrant } from './types.js'

/**
 * A worker's tokens in hand, per bucket, taken from one pool (Redis, or the primary). A request whose buckets all
 * have enough tokens in hand is decided here, synchronously, with no round trip; only a bucket that ran out asks the
 * pool again (one request in flight per bucket, however many requests wait on it).
 *
 * - All-or-nothing: a request takes its cost from every bucket it draws from, or nothing; a request refused by one
 *   bucket gives back at once what it had just leased from the others. The pool grants at least the cost of the
 *   request that asked, or nothing, so any cost up to the limit can be admitted however many holders share it.
 * - A lease belongs to one window (or slot) of the pool's clock. It is used until `sent + resetMs` by this table's
 *   monotonic clock, which is never later than the window's real end (the pool read its clock after we sent), so no
 *   token outlives its window, and a step of the wall clock changes nothing.
 * - Tokens not needed go back at the next sweep (every SWEEP_MS): all of a lease unused for IDLE_RETURN_MS, and of one
 *   in use, whatever exceeds what it used in the last MAX_HOLD_MS. A give-back carries this table's holder id and a
 *   sequence number, so a pool applies it once however often it is delivered.
 * - The block asked for adapts to demand: it doubles when a lease ran out within FAST_MS and half its life, halves when
 *   it lasted longer
 *   than MAX_HOLD_MS or ended with tokens unused; the pool caps it by what is left and how many holders share it (see
 *   grantSize).
 * - Never open (the `offline` option, for the primary's pool): when the pool fails or does not answer, the table
 *   admits from the tokens in hand (already counted by the pool) and refuses the rest as unavailable, asking the pool
 *   again after POOL_RETRY_MS; it never admits a request nobody counted. Without the option a failure rejects the take
 *   (the limiter falls back to the primary's pool).
 */

/** One bucket a request draws from. */
export interface TakeItem {
  readonly key: string
  readonly limit: number
  readonly windowMs: number
  readonly algorithm: Algorithm
  readonly burst: number
  /** The rule's shape (src/limiter/pool.ts shapeOf): tokens leased under another shape are not used. */
  readonly shape: string
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
      /** Index of the first bucket without room. */
      readonly failed: number
      /** Milliseconds until that bucket may have room again (Retry-After, and a delayed request's next try). */
      readonly resetMs: number
      /** Refused because the bucket cannot be counted (a whenRedisDown: deny rule while Redis is unusable). */
      readonly unavailable?: true
    }

/** Table options. */
export interface LeaseTableOptions {
  /** When the pool fails (the primary's pool), decide from the tokens in hand instead of rejecting the take. */
  readonly offline?: boolean
  /** This holder's id in give-backs (unique among the pool's holders). */
  readonly holder?: string
  /** The table's clock: monotonic milliseconds. */
  readonly now?: () => number
}

export const SWEEP_MS = 100
export const IDLE_RETURN_MS = 400
export const MAX_HOLD_MS = 1_000
const FAST_MS = 1_000
const FIRST_WANT = 16
const MAX_WANT = 16_384
/** After the pool said "no room", requests are refused locally at most this long before the pool is asked again. */
const EXHAUSTED_RECHECK_MS = 200
/** After the pool failed, requests are decided from the tokens in hand this long before the pool is asked again. */
export const POOL_RETRY_MS = 500
/** A bucket nobody asked for this long is forgotten (unless it holds tokens). */
export const FORGET_MS = 5_000
/** A request that lost the race for freshly granted tokens this many times is refused (contention, not a limit). */
const MAX_ATTEMPTS = 64

interface Lease {
  readonly key: string
  tokens: number
  windowStart: number
  shape: string
  algorithm: Algorithm
  /** Local time after which the lease's window may be over. */
  expiresAt: number
  poolRemaining: number
  grantedAt: number
  lastUsed: number
  /** Start of the current hold period, and the tokens used in it. */
  periodStart: number
  periodUsed: number
  want: number
  /** The pool said no room: refuse locally until then, and say room may come back at retryAt. */
  exhaustedUntil: number
  retryAt: number
  refill: Promise<void> | null
  /** Units the requests waiting on the refill in flight need. */
  waiting: number
  /** Tokens the last refill granted (a refused request gives them back at once). */
  lastGrant: number
  /** The pool failed: decide from the tokens in hand until then. */
  poolDownUntil: number
  /** In the table's set of leases holding tokens. */
  holding: boolean
  /** Grants received (a token bucket's unused `need` tokens are dropped after the grant's turn). */
  grants: number
}

/** What a lease table reports (the limiter's metrics). */
export interface LeaseEvents {
  leased(tokens: number): void
  returned(tokens: number): void
  /** A request refused because its pool did not answer and no tokens were in hand. */
  unavailable?(): void
}

/**
 * The first block to ask for: a token bucket's leases last a few milliseconds (src/limiter/pool.ts bucketSlotMs), so
 * it starts at one token and grows with use; a window's lease lasts its window.
 */
function firstWant(it: TakeItem): number {
  return it.algorithm === 'token-bucket' ? 1 : FIRST_WANT
}

/**
 * A lease is over: what was left of it is worth nothing (and counted nowhere new). Tokens left unused mean the block
 * was bigger than this worker's use within a lease: it asks for half as many next time.
 */
function expire(l: Lease): void {
  if (l.tokens > 0) l.want = Math.max(1, l.want >> 1)
  l.tokens = 0
}

/** A worker's leases from one pool. */
export class LeaseTable {
  readonly #pool: LeasePool
  readonly #holders: number
  readonly #events: LeaseEvents
  readonly #now: () => number
  readonly #offline: boolean
  readonly #holder: string
  #seq = 0
  readonly #leases = new Map<string, Lease>()
  /** The leases with tokens in hand: the only ones a sweep must look at every time. */
  readonly #holding = new Set<Lease>()
  /** When to look at a lease again to forget it. */
  readonly #forget = new ExpiryWheel()
  /** The leases of the take being decided (takeLocal is synchronous, so one array serves every take). */
  readonly #scratch: Lease[] = []

  constructor(pool: LeasePool, holders: number, events: LeaseEvents, options: LeaseTableOptions = {}) {
    this.#pool = pool
    this.#holders = Math.max(1, holders)
    this.#events = events
    this.#now = options.now ?? (() => performance.now())
    this.#offline = options.offline === true
    // Random: pids repeat across hosts and containers, and a restarted worker starts its sequence again.
    this.#holder = options.holder ?? randomUUID()
  }

  /** Decides a request: synchronously when every bucket has its cost in hand (or one is known full). */
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
      if (l === undefined || l.shape !== it.shape) missing = true
      else if (l.tokens >= it.cost && l.expiresAt > now) found[i] = l
      else if (l.exhaustedUntil > now) return { allowed: false, failed: i, resetMs: Math.max(1, l.retryAt - now) }
      else missing = true
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

  /**
   * Refills every bucket that needs it, then decides; a pool failure rejects the take, or (offline) refuses it as
   * unavailable unless every bucket has the tokens in hand.
   */
  async #takeSlow(items: readonly TakeItem[]): Promise<TakeResult> {
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
      const now = this.#now()
      const refills: Promise<void>[] = []
      const refilled: Lease[] = []
      let down = -1
      for (let i = 0; i < items.length; i++) {
        const it = items[i]!
        const l = this.#lease(it, now)
        if (l.tokens >= it.cost && l.expiresAt > now) continue
        if (l.exhaustedUntil > now) continue
        if (this.#offline && l.poolDownUntil > now) {
          if (down === -1) down = i
          continue
        }
        refilled.push(l)
        refills.push(this.#refill(l, it, now))
      }
      if (refills.length > 0) {
        const outcomes = await Promise.allSettled(refills)
        for (let j = 0; j < outcomes.length; j++) {
          const o = outcomes[j]!
          if (o.status === 'fulfilled') continue
          if (!this.#offline) throw o.reason
          if (down === -1) down = items.findIndex((it) => it.key === refilled[j]!.key)
        }
      }
      const result = this.takeLocal(items)
      if (result !== null) {
        if (!result.allowed) this.#giveBackFresh(refilled, items[result.failed]!.key)
        return result
      }
      if (down !== -1) {
        // The pool does not answer and the tokens in hand do not cover the request: nobody could count it.
        this.#giveBackFresh(refilled, items[down]!.key)
        this.#events.unavailable?.()
        const l = this.#leases.get(items[down]!.key)
        return { allowed: false, failed: down, resetMs: Math.max(1, (l?.poolDownUntil ?? now) - this.#now()), unavailable: true }
      }
    }
    return { allowed: false, failed: 0, resetMs: EXHAUSTED_RECHECK_MS }
  }

  /** A refused request gives back at once what it had just leased of the other buckets. */
  #giveBackFresh(refilled: readonly Lease[], failedKey: string): void {
    for (const l of refilled) {
      if (l.key === failedKey || l.refill !== null) continue
      const back = Math.min(l.tokens, l.lastGrant)
      l.lastGrant = 0
      if (back > 0) this.#release(l, back)
    }
  }

  /** The lease of a bucket, made fresh when its window is over or its rule changed shape. */
  #lease(it: TakeItem, now: number): Lease {
    let l = this.#leases.get(it.key)
    if (l === undefined) {
      l = {
        key: it.key,
        tokens: 0,
        windowStart: -1,
        shape: it.shape,
        algorithm: it.algorithm,
        expiresAt: 0,
        poolRemaining: 0,
        grantedAt: now,
        lastUsed: now,
        periodStart: now,
        periodUsed: 0,
        want: firstWant(it),
        exhaustedUntil: 0,
        retryAt: 0,
        refill: null,
        waiting: 0,
        lastGrant: 0,
        poolDownUntil: 0,
        holding: false,
        grants: 0,
      }
      this.#leases.set(it.key, l)
      this.#scheduleForget(l)
    } else if (l.shape !== it.shape) {
      // The rule changed: tokens leased under the old one are not used (the pool carried them over as used).
      l.tokens = 0
      l.windowStart = -1
      l.shape = it.shape
      l.algorithm = it.algorithm
      l.expiresAt = 0
      l.exhaustedUntil = 0
      l.want = firstWant(it)
    } else if (l.expiresAt <= now) {
      expire(l)
    }
    return l
  }

  /** One pool request per bucket at a time; everyone who needs the bucket meanwhile waits on the same one. */
  #refill(l: Lease, it: TakeItem, now: number): Promise<void> {
    l.waiting += it.cost
    if (l.refill !== null) return l.refill
    if (l.windowStart >= 0 && l.expiresAt > now) {
      // It ran out before its end: within half its life (and a second), more would have been used.
      const lasted = now - l.grantedAt
      if (lasted < Math.min(FAST_MS, (l.expiresAt - l.grantedAt) / 2)) l.want = Math.min(MAX_WANT, l.want * 2)
      else if (lasted > MAX_HOLD_MS) l.want = Math.max(1, l.want >> 1)
    }
    const sent = now
    const want = Math.max(l.want, l.waiting, it.cost)
    const req = { key: it.key, limit: it.limit, windowMs: it.windowMs, want, need: it.cost, holders: this.#holders, algorithm: it.algorithm, burst: it.burst }
    const shape = it.shape
    l.refill = this.#pool.acquire(req).then(
      (g) => this.#granted(l, g, sent, shape, it.cost),
      (err: unknown) => {
        l.refill = null
        l.waiting = 0
        l.poolDownUntil = this.#now() + POOL_RETRY_MS
        throw err
      },
    )
    return l.refill
  }

  #granted(l: Lease, g: LeaseGrant, sent: number, shape: string, need: number): void {
    const now = this.#now()
    l.refill = null
    l.waiting = 0
    l.poolDownUntil = 0
    // The rule changed while the request was out: its tokens belong to the old rule and are not used here.
    if (shape !== l.shape) return
    // Tokens of an earlier window are no use in this one.
    if (g.windowStart !== l.windowStart) expire(l)
    // Nothing granted: resetMs says when to ask again, which must not stretch the life of tokens still in hand.
    const expiresAt = sent + g.resetMs
    l.expiresAt = g.granted === 0 && l.tokens > 0 ? Math.min(l.expiresAt, expiresAt) : expiresAt
    l.tokens += g.granted
    l.lastGrant = g.granted
    l.windowStart = g.windowStart
    l.poolRemaining = g.remaining
    l.grantedAt = now
    l.lastUsed = now
    if (l.tokens === g.granted) {
      l.periodStart = now
      l.periodUsed = 0
    }
    l.exhaustedUntil = g.granted === 0 ? now + Math.min(g.retryMs, EXHAUSTED_RECHECK_MS) : 0
    l.retryAt = sent + g.retryMs
    if (l.tokens > 0 && !l.holding) {
      l.holding = true
      this.#holding.add(l)
    }
    if (g.granted > 0) this.#events.leased(g.granted)
    // A token bucket counts a grant's `need` tokens as used at once (src/limiter/pool.ts): the requests waiting on
    // this refill decide in this turn of the loop, and what they leave of those tokens is dropped, never kept in hand.
    if (l.algorithm === 'token-bucket' && g.granted > 0) {
      // An answer slower than its lease: the surplus is void, but the asked-for tokens still serve this turn.
      if (l.expiresAt <= now) {
        l.tokens = Math.min(l.tokens, need)
        l.expiresAt = now + 1
      }
      const most = l.tokens - need
      const grant = ++l.grants
      setImmediate(() => {
        if (l.grants === grant && l.tokens > most) l.tokens = Math.max(0, most)
      })
    }
  }

  /** Gives back tokens not needed any more (the caller runs it every SWEEP_MS) and forgets idle buckets. */
  sweep(): void {
    const now = this.#now()
    for (const l of this.#holding) {
      if (l.refill !== null) continue
      if (l.expiresAt <= now) expire(l)
      else if (now - l.lastUsed >= IDLE_RETURN_MS) this.#release(l, l.tokens)
      else if (now - l.periodStart >= MAX_HOLD_MS) {
        // Still in use, but holding more than a hold period's worth: the excess goes back, the rest is needed.
        const excess = l.tokens - l.periodUsed
        if (excess > 0) {
          this.#release(l, excess)
          l.want = Math.max(1, l.want >> 1)
        }
        l.periodStart = now
        l.periodUsed = 0
      }
      if (l.tokens === 0) {
        l.holding = false
        this.#holding.delete(l)
      }
    }
    this.#forget.sweep(now, 10_000, 2, (key) => {
      const l = this.#leases.get(key)
      if (l === undefined) return null
      // Kept while it holds tokens, waits on the pool, remembers a refusal or an outage, or was used lately.
      const keep = Math.max(l.lastUsed + FORGET_MS, l.exhaustedUntil, l.poolDownUntil)
      if (l.refill !== null || l.tokens > 0 || keep > now) return Math.max(keep, now + SWEEP_MS)
      this.#leases.delete(key)
      return null
    })
  }

  #scheduleForget(l: Lease): void {
    this.#forget.schedule(l.key, l.lastUsed + FORGET_MS)
  }

  #release(l: Lease, tokens: number): void {
    this.#pool.release({ key: l.key, windowStart: l.windowStart, tokens, algorithm: l.algorithm, shape: l.shape, holder: this.#holder, seq: ++this.#seq })
    this.#events.returned(tokens)
    l.poolRemaining += tokens
    l.tokens -= tokens
  }

  /** Drops the leases of one bucket, or of every bucket of a rule (their pool count was reset). */
  forget(rule: string, bucket: string | null, prefix = ''): void {
    for (const [key, l] of this.#leases) {
      const k = key.startsWith(prefix) ? key.slice(prefix.length) : key
      if (bucket !== null ? k === bucket : k === rule || k.startsWith(rule + '|') || k.startsWith(rule + '#') || k.startsWith(rule + '~')) {
        this.#leases.delete(key)
        this.#holding.delete(l)
      }
    }
  }

  /** Forgets which buckets the pool called full (a new rule set may have raised their limits). */
  clearExhausted(): void {
    for (const l of this.#leases.values()) l.exhaustedUntil = 0
  }

  /** Gives every unused token back (a worker about to exit). */
  releaseAll(): void {
    const now = this.#now()
    for (const l of this.#holding) {
      if (l.tokens > 0 && l.expiresAt > now) this.#release(l, l.tokens)
    }
    this.#holding.clear()
    this.#leases.clear()
  }

  /** How many buckets this table tracks. */
  get size(): number {
    return this.#leases.size
  }
}
