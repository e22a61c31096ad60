/**
 * The lease contract every limiter store keeps (Redis, the primary's memory), and the in-memory implementation.
 *
 * A pool holds one count per bucket and window. A holder (a worker) asks for up to `want` tokens of a bucket; the pool
 * grants what it can in one atomic step and counts them as used. The holder admits requests against the tokens
 * in hand without asking again (src/limiter/leases.ts) and gives back what it did not use. The pool never grants
 * more than `limit` in a window, so no arrangement of holders can admit more than `limit` (the hard guarantee).
 *
 * Fixed windows aligned to the pool's clock: a window of W ms holds [k*W, (k+1)*W). Another algorithm plugs in by
 * implementing `acquire` and `release` for its own state: whatever can grant N tokens atomically can lease.
 */

/** One lease request: a bucket, its rule's limit and window, how many tokens the holder would like. */
export interface LeaseRequest {
  readonly key: string
  readonly limit: number
  readonly windowMs: number
  readonly want: number
  /** How many holders share the pool (instances x workers): grants shrink with it. */
  readonly holders: number
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
  release(key: string, windowStart: number, tokens: number): void
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
  start: number
  count: number
}

/** The pool in this process's memory (the primary's): synchronous, so every grant is atomic. */
export class MemoryPool {
  readonly #entries = new Map<string, Entry>()
  readonly #now: () => number

  constructor(now: () => number = Date.now) {
    this.#now = now
  }

  /** Grants up to `req.want` tokens of the bucket's current window. */
  acquire(req: LeaseRequest): LeaseGrant {
    const now = this.#now()
    const start = now - (now % req.windowMs)
    let e = this.#entries.get(req.key)
    if (e === undefined) {
      e = { start, count: 0 }
      this.#entries.set(req.key, e)
    } else if (e.start !== start) {
      e.start = start
      e.count = 0
    }
    const granted = grantSize(req.limit - e.count, req.want, req.holders)
    e.count += granted
    return { granted, remaining: Math.max(0, req.limit - e.count), resetMs: start + req.windowMs - now, windowStart: start }
  }

  /** Takes back unused tokens, if their window is still the bucket's current one. */
  release(key: string, windowStart: number, tokens: number): void {
    const e = this.#entries.get(key)
    if (e !== undefined && e.start === windowStart) e.count = Math.max(0, e.count - tokens)
  }

  /** Forgets buckets whose window ended (call now and then to bound memory). */
  sweep(maxWindowMs: number): void {
    const now = this.#now()
    for (const [key, e] of this.#entries) {
      if (e.start + maxWindowMs <= now) this.#entries.delete(key)
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

  release(key: string, windowStart: number, tokens: number): void {
    this.memory.release(key, windowStart, tokens)
  }
}
