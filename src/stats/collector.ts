import type { Logger } from '../log.js'
import { mergeBatches } from './batch.js'
import type { StatsBatch } from './types.js'
import { resolutionFor, summarize, type StatsAnswer, type StatsQuery } from './query.js'
import { RESOLUTION_MS, type StatsStore } from './store.js'

/**
 * The primary's side of statistics: workers send their batches over IPC about once a second; the collector adds
 * them up and writes them to the store once a second (one Redis transaction per instance per second). While the store
 * fails, batches wait, summed per minute; past MAX_PENDING_MINUTES the oldest are dropped and counted.
 */

const MAX_PENDING_MINUTES = 60
/** Heavy hitters kept per kind while batches wait. */
const PENDING_TOP = 1_000

export class StatsCollector {
  readonly #store: StatsStore
  readonly #log: Logger
  #pending: StatsBatch[] = []
  #failing = false
  #flushing: Promise<void> | null = null
  /** Requests whose statistics were dropped after a long store outage. */
  dropped = 0

  constructor(store: StatsStore, log: Logger) {
    this.#store = store
    this.#log = log
  }

  get storeKind(): 'redis' | 'memory' {
    return this.#store.kind
  }

  /** Takes batches from a worker. */
  add(batches: readonly StatsBatch[]): void {
    if (batches.length > 0) this.#pending.push(...batches)
  }

  /** Writes what is pending; on failure keeps it for the next flush. */
  flush(): Promise<void> {
    this.#flushing ??= this.#flushOnce().finally(() => (this.#flushing = null))
    return this.#flushing
  }

  async #flushOnce(): Promise<void> {
    if (this.#pending.length === 0) return
    let batches = mergeBatches(this.#pending, PENDING_TOP)
    if (batches.length > MAX_PENDING_MINUTES) {
      for (const b of batches.slice(0, batches.length - MAX_PENDING_MINUTES)) for (const [, n] of b.counts) this.dropped += n
      batches = batches.slice(-MAX_PENDING_MINUTES)
    }
    this.#pending = batches
    if (!this.#store.ready) return // not connected (yet): keep them, summed, for when it is
    this.#pending = []
    try {
      await this.#store.apply(batches)
      if (this.#failing) this.#log.info('statistics store is back; pending statistics written')
      this.#failing = false
    } catch (err) {
      if (!this.#failing) this.#log.warn('statistics store failed; keeping statistics to retry', { error: (err as Error).message })
      this.#failing = true
      this.#pending = batches.concat(this.#pending)
    }
  }

  /** Answers a statistics query. */
  async query(q: StatsQuery): Promise<StatsAnswer> {
    const resolution = resolutionFor(q.from, q.to)
    const step = RESOLUTION_MS[resolution]
    const buckets = await this.#store.read(resolution, q.from - (q.from % step), q.to)
    return summarize(buckets, q, resolution)
  }
}
