import { Tally } from './batch.js'
import type { StatsBatch } from './types.js'

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

function readTally(t: Tally): Bucket {
  return {
    time: t.time,
    counts: new Map(t.counts),
    latency: new Map(t.latency),
    ips: new Map(t.ips.top()),
    paths: new Map(t.paths.top()),
    pairs: new Map(t.pairs.top()),
  }
}

/** Statistics in the primary's memory: this instance only, gone at restart. */
export class MemoryStatsStore implements StatsStore {
  readonly kind = 'memory'
  readonly ready = true
  readonly #retention: Retention
  readonly #now: () => number
  readonly #buckets: Record<Resolution, Map<number, Tally>> = { minute: new Map(), hour: new Map() }

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
          bucket = new Tally(t, TOP_KEEP)
          this.#buckets[res].set(t, bucket)
        }
        bucket.add(b)
      }
    }
    this.#expire()
  }

  async read(resolution: Resolution, from: number, to: number): Promise<Bucket[]> {
    const out: Bucket[] = []
    for (const b of this.#buckets[resolution].values()) if (b.time >= from && b.time <= to) out.push(readTally(b))
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
