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
 * - token-bucket: a bucket of `burst` tokens refilled at `limit` per W, leased too. A token held by a worker while the
 *   bucket refilled behind it would let a later burst exceed `burst`, so the pool counts what it granted in the
 *   current BUCKET_SLOT_MS slot as held (a lease lasts until its slot ends) and refills the bucket only up to
 *   `burst - held`: tokens in the bucket plus tokens in hand never exceed `burst`, so no span of T ms admits more than
 *   burst + rate x T. A lease's unused tokens go back while its slot lasts; after that they count as used.
 */

/** How a bucket counts (a rule's `algorithm`). */
export type Algorithm = 'fixed' | 'sliding' | 'token-bucket'

/** Slots of a sliding window (src/limiter/redis-pool.ts uses the same number). */
export const SLIDING_SLOTS = 10
/** How long a token-bucket lease lasts (its slot; src/limiter/redis-pool.ts uses the same number). */
export const BUCKET_SLOT_MS = 1_000

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
  /** token-bucket: the current slot's start and the tokens granted in it and not given back (held). */
  slot: number
  held: number
  /** token-bucket: when it will be full again if nobody takes from it (until then it must not be forgotten). */
  fullAt: number
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
      e = { start: -1, count: 0, slots: null, slot: -1, held: 0, fullAt: 0 }
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
    let resetMs = slot + slotMs - now
    if (granted === 0) {
      // Full: room comes back when the oldest slots leave the window (a slot counts until `window` after its end).
      let freed = used
      for (const start of [...slots.keys()].sort((a, b) => a - b)) {
        freed -= slots.get(start)!
        if (freed < req.limit) {
          resetMs = Math.max(resetMs, start + slotMs + req.windowMs - now)
          break
        }
      }
    }
    return { granted, remaining: Math.max(0, req.limit - used - granted), resetMs, windowStart: slot }
  }

  #tokenBucket(e: Entry, req: LeaseRequest, now: number): LeaseGrant {
    const perMs = req.limit / req.windowMs
    const slot = now - (now % BUCKET_SLOT_MS)
    if (e.start < 0) e.count = req.burst
    else if (e.slot !== slot) {
      // Up to the end of the old slot the bucket refilled only to burst - held; then its leases ended (unused
      // tokens count as used) and it refills to burst.
      const slotEnd = e.slot + BUCKET_SLOT_MS
      e.count = Math.min(req.burst - e.held, e.count + (slotEnd - e.start) * perMs)
      e.count = Math.min(req.burst, e.count + (now - slotEnd) * perMs)
    } else {
      e.count = Math.min(req.burst - e.held, e.count + (now - e.start) * perMs)
    }
    if (e.slot !== slot) {
      e.slot = slot
      e.held = 0
    }
    e.start = now
    const granted = grantSize(Math.floor(e.count), req.want, req.holders)
    e.count -= granted
    e.held += granted
    e.fullAt = slot + BUCKET_SLOT_MS + Math.ceil((req.burst - e.count) / perMs)
    // A lease lasts until its slot ends; with nothing granted, resetMs is when the next token comes.
    let resetMs = slot + BUCKET_SLOT_MS - now
    if (granted === 0) {
      const capped = req.burst - e.held < 1 // the tokens in hand fill it: nothing comes back before the slot ends
      resetMs = Math.max(1, Math.ceil((1 - e.count) / perMs), capped ? resetMs : 0)
    }
    return { granted, remaining: Math.floor(e.count), resetMs, windowStart: slot }
  }

  /** Takes back unused tokens: of the current fixed window, of the slot they came from, or into the bucket. */
  release(key: string, windowStart: number, tokens: number, algorithm: Algorithm = 'fixed'): void {
    const e = this.#entries.get(key)
    if (e === undefined) return
    if (algorithm === 'token-bucket') {
      if (e.slot !== windowStart) return // its lease ended: the tokens count as used
      const back = Math.min(tokens, e.held)
      e.held -= back
      e.count += back
    } else if (algorithm === 'sliding') {
      const n = e.slots?.get(windowStart)
      if (n !== undefined) e.slots!.set(windowStart, Math.max(0, n - tokens))
    } else if (e.start === windowStart) e.count = Math.max(0, e.count - tokens)
  }

  /** Forgets buckets whose window ended (call now and then to bound memory). */
  sweep(maxWindowMs: number): void {
    const now = this.#now()
    for (const [key, e] of this.#entries) {
      // Forgotten once forgetting changes nothing: a fixed window that ended, a sliding window whose slots all left
      // it, a token bucket that is full again (a new entry starts full).
      const done =
        e.slot >= 0 ? e.fullAt <= now : e.slots !== null ? [...e.slots.keys()].every((s) => s + maxWindowMs * 2 <= now) : e.start + maxWindowMs <= now
      if (done) this.#entries.delete(key)
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
