/**
 * The counting contract every limiter store keeps, and the in-memory implementation of it.
 *
 * Fixed windows aligned to the epoch: a window of W ms holds the requests of [k*W, (k+1)*W). A request takes one unit
 * from every bucket it draws from, or from none: if any bucket is full, nothing is counted anywhere (all-or-nothing),
 * so a rejected request never uses up another rule's budget.
 */

/** One bucket a request draws from. */
export interface TakeItem {
  readonly key: string
  readonly limit: number
  readonly windowMs: number
}

/** The outcome of a take. */
export type TakeResult =
  | {
      readonly allowed: true
      /** Per bucket, in request order: units left in the window after this request. */
      readonly remaining: readonly number[]
      /** Per bucket: milliseconds until its window ends. */
      readonly resetMs: readonly number[]
    }
  | {
      readonly allowed: false
      /** Index of the first full bucket. */
      readonly failed: number
      /** Milliseconds until that bucket's window ends. */
      readonly resetMs: number
    }

/** A place counts are kept: memory, the primary over IPC, or Redis. */
export interface CounterStore {
  take(items: readonly TakeItem[]): Promise<TakeResult> | TakeResult
}

interface Entry {
  start: number
  count: number
}

/** Counts in this process's memory. Synchronous, so a take is atomic within the process. */
export class MemoryCounter implements CounterStore {
  readonly #entries = new Map<string, Entry>()
  readonly #now: () => number

  constructor(now: () => number = Date.now) {
    this.#now = now
  }

  /** Takes one unit from every bucket, or from none. */
  take(items: readonly TakeItem[]): TakeResult {
    const now = this.#now()
    const entries: Entry[] = new Array(items.length)
    for (let i = 0; i < items.length; i++) {
      const { key, limit, windowMs } = items[i]!
      const start = now - (now % windowMs)
      let e = this.#entries.get(key)
      if (e === undefined) {
        e = { start, count: 0 }
        this.#entries.set(key, e)
      } else if (e.start !== start) {
        e.start = start
        e.count = 0
      }
      if (e.count >= limit) return { allowed: false, failed: i, resetMs: start + windowMs - now }
      entries[i] = e
    }
    const remaining: number[] = new Array(items.length)
    const resetMs: number[] = new Array(items.length)
    for (let i = 0; i < items.length; i++) {
      const e = entries[i]!
      e.count++
      remaining[i] = items[i]!.limit - e.count
      resetMs[i] = e.start + items[i]!.windowMs - now
    }
    return { allowed: true, remaining, resetMs }
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
