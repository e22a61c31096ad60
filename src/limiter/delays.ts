import type { LimiterMetrics } from './metrics.js'

/**
 * The requests of `onExceed: delay` rules waiting for room, in one first-come-first-served queue per bucket: at most
 * PER_BUCKET per bucket and TOTAL per worker (each holds a socket). Only the head of a queue asks the limiter again
 * (when the pool said room comes back); the others wait their turn on a promise, with no timer but their deadline.
 * When the head is admitted (or leaves), the next one is the head at once.
 */

/** Requests one bucket may hold waiting in a worker; the next one is refused at once. */
export const PER_BUCKET = 32
/** Requests waiting in a worker over every bucket. */
export const TOTAL = 1_000

/** Something that says when the client went away (the response). */
export interface Closable {
  once(ev: 'close', f: () => void): unknown
  off(ev: 'close', f: () => void): unknown
}

/** A place in a bucket's queue. */
export interface Ticket {
  /** Resolves once this request is the head of its queue. */
  readonly turn: Promise<void>
  /** Gives the place back (the next request becomes the head). Call once. */
  leave(): void
}

interface Place {
  wake: () => void
}

export class DelayQueues {
  readonly #queues = new Map<string, Place[]>()
  #total = 0
  readonly #metrics: LimiterMetrics

  constructor(metrics: LimiterMetrics) {
    this.#metrics = metrics
  }

  /** How many requests wait in this worker, over every bucket. */
  get total(): number {
    return this.#total
  }

  /** How many requests wait on `bucket` in this worker. */
  waiting(bucket: string): number {
    return this.#queues.get(bucket)?.length ?? 0
  }

  /** Takes a place at the end of `bucket`'s queue; null when it or the worker is full. */
  enter(bucket: string): Ticket | null {
    let queue = this.#queues.get(bucket)
    if ((queue?.length ?? 0) >= PER_BUCKET || this.#total >= TOTAL) return null
    if (queue === undefined) {
      queue = []
      this.#queues.set(bucket, queue)
    }
    const place: Place = { wake: () => {} }
    const turn = new Promise<void>((resolve) => (place.wake = resolve))
    queue.push(place)
    if (queue.length === 1) place.wake()
    this.#total++
    this.#metrics.delayWaiting.inc()
    let left = false
    return {
      turn,
      leave: () => {
        if (left) return
        left = true
        const i = queue.indexOf(place)
        if (i !== -1) queue.splice(i, 1)
        if (queue.length === 0) this.#queues.delete(bucket)
        else if (i === 0) queue[0]!.wake()
        this.#total--
        this.#metrics.delayWaiting.dec()
      },
    }
  }

  /** Resolves true once `turn` resolves, false after `ms` or when the client goes away. */
  static until(turn: Promise<void>, ms: number, closed: Closable): Promise<boolean> {
    return new Promise((resolve) => {
      const done = (ok: boolean): void => {
        clearTimeout(timer)
        closed.off('close', gone)
        resolve(ok)
      }
      const gone = (): void => done(false)
      const timer = setTimeout(() => done(false), Math.max(0, ms))
      closed.once('close', gone)
      void turn.then(() => done(true))
    })
  }

  /** Sleeps `ms`, or until the client goes away; resolves false if it went. */
  static wait(ms: number, closed: Closable): Promise<boolean> {
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
