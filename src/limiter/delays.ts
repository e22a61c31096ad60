import type { LimiterMetrics } from './metrics.js'

/**
 * The requests of `onExceed: delay` rules waiting for room: at most PER_BUCKET per bucket and TOTAL per worker (each
 * holds a socket). A waiter sleeps on one timer (no polling loop) until the time its verdict said room comes back,
 * then is decided again; past its rule's maxDelay it gets its 429.
 */

/** Requests one bucket may hold waiting in a worker; the next one is refused at once. */
export const PER_BUCKET = 32
/** Requests waiting in a worker over every bucket. */
export const TOTAL = 1_000

export class DelayQueues {
  readonly #waiting = new Map<string, number>()
  #total = 0
  readonly #metrics: LimiterMetrics

  constructor(metrics: LimiterMetrics) {
    this.#metrics = metrics
  }

  /** Takes a place in `bucket`'s queue; false when it or the worker is full. */
  enter(bucket: string): boolean {
    const n = this.#waiting.get(bucket) ?? 0
    if (n >= PER_BUCKET || this.#total >= TOTAL) return false
    this.#waiting.set(bucket, n + 1)
    this.#total++
    this.#metrics.delayWaiting.inc()
    return true
  }

  /** Gives the place back. */
  leave(bucket: string): void {
    const n = this.#waiting.get(bucket) ?? 0
    if (n <= 1) this.#waiting.delete(bucket)
    else this.#waiting.set(bucket, n - 1)
    this.#total--
    this.#metrics.delayWaiting.dec()
  }

  /** Sleeps `ms`, or until the client goes away; resolves false if it went. */
  static wait(ms: number, closed: { once(ev: 'close', f: () => void): unknown; off(ev: 'close', f: () => void): unknown }): Promise<boolean> {
    return new Promise((resolve) => {
      const gone = (): void => {
        clearTimeout(timer)
        resolve(false)
      }
      const timer = setTimeout(() => {
        closed.off('close', gone)
        resolve(true)
      }, ms)
      closed.once('close', gone)
    })
  }
}
