/**
 * The lease contract every limiter store keeps (Redis, the primary's memory), and the in-memory implementation.
 *
 * A pool holds one count per bucket and window. A holder (a worker) asks for up to `want` tokens of a bucket; the pool
 * grants what it can in one atomic step and counts them as used. The holder admits requests against the tokens
 * in hand without asking again (src/limiter/leases.ts) and gives back what it did not use. The pool never grants
 * more than `limit` in a window, so no arrangement of holders can admit more than `limit` (the hard guarantee).
 *
 * Three algorithms, each granting atomically from its own state:
 * - fixed: windows aligned to the pool's clock: a window of W ms holds [k*W, (k+1)*W).
 * - sliding: W is cut into SLIDING_SLOTS slots; a lease belongs to the current slot, and a grant is allowed only while
 *   the current slot plus the SLIDING_SLOTS before it hold at most `limit`. Any span of W ms lies within such
 *   SLIDING_SLOTS + 1 consecutive slots, and a slot's tokens are used only in that slot, so no span of W ever admits
 *   more than `limit` (conservative: after a burst, room comes back up to one slot, W / SLIDING_SLOTS, later).
 * - token-bucket: a bucket of `burst` tokens refilled at `limit` per W. Not leased: a token held by a worker while
 *   the bucket refills behind it would let a later burst exceed `burst`, so each request takes its tokens from the
 *   pool, all or none (one pool call per request; see the limiter).
 */

/** How a bucket counts (a rule's `algorithm`). */
export type Algorithm = 'fixed' | 'sliding' | 'token-bucket'

/** Slots of a sliding window (src/limiter/redis-pool.ts uses the same number). */
export const SLIDING_SLOTS = 10

/** One lease request: a bucket, its rule's limit and window, how many tokens the holder would like. */
export interface LeaseRequest {
  readonly key: string
  readonly limit: number
  readonly windowMs: number
  readonly want: number
  /** How many holders share the pool (instances x workers): grants shrink with it. */
  readonly holders: number
  readonly algorithm: Algorithm
  /** token-bucket: the bucket's size. */
  readonly burst: number
}

/** What the pool granted. */
export interface LeaseGrant {
  /** Tokens granted, 0 when the window is exhausted. */
  readonly granted: number
  /** Tokens left in the pool for this window after the grant. */
  readonly remaining: number
  /** Milliseconds until the window ends, by the pool's clock. */
  readonly resetMs: number
  /** The window's start by the pool's clock: it identifies the window a release belongs to. */
  readonly windowStart: number
}

/** A place counts are kept: Redis, or the primary (in its memory, or over IPC from a worker). */
export interface LeasePool {
  acquire(req: LeaseRequest): Promise<LeaseGrant>
  /** Gives back unused tokens of a window (ignored once that window is over). Fire and forget. */
  release(key: string, windowStart: number, tokens: number, algorithm: Algorithm): void
}

/**
 * How many tokens to grant when `left` remain: at most a quarter of an even share per holder, at least 1, never
 * more than asked. A bucket near its limit is decided one request at a time; a big one leases in blocks.
 * (The Redis script does the same arithmetic in Lua: keep the two in step.)
 */
export function grantSize(left: number, want: number, holders: number): number {
  if (left <= 0) return 0
  return Math.min(want, left, Math.max(1, Math.floor(left / (4 * holders))))
}

interface Entry {
  /** fixed: the window's start; sliding: unused; token-bucket: when `count` (the tokens in the bucket) was computed. */
  start: number
  count: number
  /** sliding: tokens granted per slot start. */
  slots: Map<number, number> | null
  /** token-bucket: the bucket's size (for releases). */
  burst: number
}

/** The pool in this process's memory (the primary's): synchronous, so every grant is atomic. */
export class MemoryPool {
  readonly #entries = new Map<string, Entry>()
  readonly #now: () => number

  constructor(now: () => number = Date.now) {
    this.#now = now
  }

  /** Grants up to `req.want` tokens of the bucket. */
  acquire(req: LeaseRequest): LeaseGrant {
    const now = this.#now()
    let e = this.#entries.get(req.key)
    if (e === undefined) {
      e = { start: -1, count: 0, slots: null, burst: req.burst }
      this.#entries.set(req.key, e)
    }
    if (req.algorithm === 'sliding') return this.#sliding(e, req, now)
    if (req.algorithm === 'token-bucket') return this.#tokenBucket(e, req, now)
    const start = now - (now % req.windowMs)
    if (e.start !== start) {
      e.start = start
      e.count = 0
    }
    const granted = grantSize(req.limit - e.count, req.want, req.holders)
    e.count += granted
    return { granted, remaining: Math.max(0, req.limit - e.count), resetMs: start + req.windowMs - now, windowStart: start }
  }

  #sliding(e: Entry, req: LeaseRequest, now: number): LeaseGrant {
    const slotMs = req.windowMs / SLIDING_SLOTS
    const slot = now - (now % slotMs)
    const oldest = slot - SLIDING_SLOTS * slotMs
    const slots = (e.slots ??= new Map())
    let used = 0
    for (const [start, n] of slots) {
      if (start < oldest) slots.delete(start)
      else used += n
    }
    const granted = grantSize(req.limit - used, req.want, req.holders)
    if (granted > 0) slots.set(slot, (slots.get(slot) ?? 0) + granted)
    return { granted, remaining: Math.max(0, req.limit - used - granted), resetMs: slot + slotMs - now, windowStart: slot }
  }

  #tokenBucket(e: Entry, req: LeaseRequest, now: number): LeaseGrant {
    const perMs = req.limit / req.windowMs
    e.burst = req.burst
    e.count = e.start < 0 ? req.burst : Math.min(req.burst, e.count + (now - e.start) * perMs)
    e.start = now
    const granted = e.count >= req.want ? req.want : 0
    e.count -= granted
    // When the next request of this size would fit.
    const resetMs = Math.max(1, Math.ceil((req.want - e.count) / perMs))
    return { granted, remaining: Math.floor(e.count), resetMs, windowStart: now }
  }

  /** Takes back unused tokens: of the current fixed window, of the slot they came from, or into the bucket. */
  release(key: string, windowStart: number, tokens: number, algorithm: Algorithm = 'fixed'): void {
    const e = this.#entries.get(key)
    if (e === undefined) return
    if (algorithm === 'token-bucket') e.count = Math.min(e.burst, e.count + tokens)
    else if (algorithm === 'sliding') {
      const n = e.slots?.get(windowStart)
      if (n !== undefined) e.slots!.set(windowStart, Math.max(0, n - tokens))
    } else if (e.start === windowStart) e.count = Math.max(0, e.count - tokens)
  }

  /** Forgets buckets whose window ended (call now and then to bound memory). */
  sweep(maxWindowMs: number): void {
    const now = this.#now()
    for (const [key, e] of this.#entries) {
      // A token bucket refills to full within its window; an idle one is as good as new.
      if (e.start + maxWindowMs <= now && (e.slots === null || [...e.slots.keys()].every((s) => s + maxWindowMs * 2 <= now))) {
        this.#entries.delete(key)
      }
    }
  }

  /** Drops the buckets of one rule, or one bucket when `bucket` is given; returns how many were dropped. */
  reset(rule: string, bucket?: string): number {
    let n = 0
    for (const key of this.#entries.keys()) {
      if (bucket !== undefined ? key === bucket : key === rule || key.startsWith(rule + '|')) {
        this.#entries.delete(key)
        n++
      }
    }
    return n
  }

  /** How many buckets are held. */
  get size(): number {
    return this.#entries.size
  }
}

/** A MemoryPool behind the asynchronous LeasePool contract (tests, and the simulation). */
export class LocalPool implements LeasePool {
  constructor(readonly memory: MemoryPool) {}

  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    return Promise.resolve(this.memory.acquire(req))
  }

  release(key: string, windowStart: number, tokens: number, algorithm: Algorithm): void {
    this.memory.release(key, windowStart, tokens, algorithm)
  }
}
