import type { StatsBatch } from './batch.js'
import { TopK } from './topk.js'

/**
 * Where statistics are kept: minute buckets and hourly rollups (every batch is added to both), each with the counts
 * by dimensions, the latency histogram and the heavy hitters (trimmed to TOP_KEEP per bucket). Two stores keep the
 * same contract: Redis (shared by every instance, survives restarts) and the primary's memory (no Redis).
 */

export type Resolution = 'minute' | 'hour'
export const RESOLUTION_MS: Record<Resolution, number> = { minute: 60_000, hour: 3_600_000 }
/** Heavy hitters kept per bucket and kind. */
export const TOP_KEEP = 200

/** One stored bucket as read back. */
export interface Bucket {
  /** Start of the bucket, ms since the epoch. */
  readonly time: number
  readonly counts: ReadonlyMap<string, number>
  readonly latency: ReadonlyMap<number, number>
  readonly ips: ReadonlyMap<string, number>
  readonly paths: ReadonlyMap<string, number>
  readonly pairs: ReadonlyMap<string, number>
}

/** How long buckets are kept, ms. */
export interface Retention {
  readonly minute: number
  readonly hour: number
}

export interface StatsStore {
  /** Adds batches into the minute and hour buckets they fall in. Rejects when nothing was written. */
  apply(batches: readonly StatsBatch[]): Promise<void>
  /** The buckets of a resolution whose start lies in [from, to], oldest first (empty ones left out). */
  read(resolution: Resolution, from: number, to: number): Promise<Bucket[]>
  /** Where statistics live, for the status endpoint. */
  readonly kind: 'redis' | 'memory'
  /** False while writes cannot succeed (Redis not connected): the caller keeps its batches. */
  readonly ready: boolean
}

class MemoryBucket {
  readonly counts = new Map<string, number>()
  readonly latency = new Map<number, number>()
  readonly ips = new TopK(TOP_KEEP)
  readonly paths = new TopK(TOP_KEEP)
  readonly pairs = new TopK(TOP_KEEP)
  constructor(readonly time: number) {}

  add(b: StatsBatch): void {
    for (const [k, n] of b.counts) this.counts.set(k, (this.counts.get(k) ?? 0) + n)
    for (const [k, n] of b.latency) this.latency.set(k, (this.latency.get(k) ?? 0) + n)
    for (const [k, n] of b.ips) this.ips.add(k, n)
    for (const [k, n] of b.paths) this.paths.add(k, n)
    for (const [k, n] of b.pairs) this.pairs.add(k, n)
  }

  read(): Bucket {
    return {
      time: this.time,
      counts: new Map(this.counts),
      latency: new Map(this.latency),
      ips: new Map(this.ips.top()),
      paths: new Map(this.paths.top()),
      pairs: new Map(this.pairs.top()),
    }
  }
}

/** Statistics in the primary's memory: this instance only, gone at restart. */
export class MemoryStatsStore implements StatsStore {
  readonly kind = 'memory'
  readonly ready = true
  readonly #retention: Retention
  readonly #now: () => number
  readonly #buckets: Record<Resolution, Map<number, MemoryBucket>> = { minute: new Map(), hour: new Map() }

  constructor(retention: Retention, now: () => number = Date.now) {
    this.#retention = retention
    this.#now = now
  }

  async apply(batches: readonly StatsBatch[]): Promise<void> {
    for (const b of batches) {
      for (const res of ['minute', 'hour'] as const) {
        const t = b.minute - (b.minute % RESOLUTION_MS[res])
        let bucket = this.#buckets[res].get(t)
        if (bucket === undefined) {
          bucket = new MemoryBucket(t)
          this.#buckets[res].set(t, bucket)
        }
        bucket.add(b)
      }
    }
    this.#expire()
  }

  async read(resolution: Resolution, from: number, to: number): Promise<Bucket[]> {
    const out: Bucket[] = []
    for (const b of this.#buckets[resolution].values()) if (b.time >= from && b.time <= to) out.push(b.read())
    return out.sort((a, b) => a.time - b.time)
  }

  #expire(): void {
    const now = this.#now()
    for (const res of ['minute', 'hour'] as const) {
      for (const t of this.#buckets[res].keys()) {
        if (t + RESOLUTION_MS[res] + this.#retention[res] < now) this.#buckets[res].delete(t)
      }
    }
  }
}
