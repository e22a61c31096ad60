import type { RedisClient } from '../redis/cluster.js'
import { MeliproxyError } from '../errors.js'
import type { Logger } from '../log.js'
import type { StatsBatch } from './types.js'
import { StatsCollector } from './collector.js'
import type { StatsAnswer, StatsQuery } from './query.js'
import { RedisStatsStore } from './redis-store.js'
import { MemoryStatsStore } from './store.js'

/** How often the statistics the workers sent are written to the store. */
const FLUSH_MS = 1_000
/** How long closing waits for the last write (Redis may be gone). */
const CLOSE_FLUSH_MS = 2_000

/** The statistics' part of the configuration (built at the edge, src/options.ts). */
export interface StatsOptions {
  /** Off: nothing is counted and queries answer stats_disabled. */
  readonly stats: boolean
  /** How long per-minute and hourly rows are kept, ms. */
  readonly statsRetention: number
  readonly statsRollupRetention: number
}

/**
 * The primary's statistics service: takes the workers' batches, writes them to Redis (or keeps them in memory
 * without Redis) once a second, answers the admin API's queries, and writes what is left when it closes.
 */
export class StatsService {
  readonly #collector: StatsCollector | null
  readonly #timer: NodeJS.Timeout

  constructor(config: StatsOptions, redis: RedisClient | null, log: Logger) {
    const retention = { minute: config.statsRetention, hour: config.statsRollupRetention }
    this.#collector = config.stats
      ? new StatsCollector(redis !== null ? new RedisStatsStore(redis, retention) : new MemoryStatsStore(retention), log)
      : null
    this.#timer = setInterval(() => void this.#collector?.flush(), FLUSH_MS)
    this.#timer.unref()
  }

  /** A worker's batches. */
  add(batches: readonly StatsBatch[]): void {
    this.#collector?.add(batches)
  }

  /** Answers the admin API: stats_disabled with --no-stats, redis_unavailable when the store cannot be read. */
  async query(q: StatsQuery): Promise<StatsAnswer> {
    if (this.#collector === null) throw new MeliproxyError('stats_disabled', 'statistics are off (--no-stats)')
    try {
      return await this.#collector.query(q)
    } catch (err) {
      throw new MeliproxyError('redis_unavailable', `statistics could not be read: ${(err as Error).message}`)
    }
  }

  /** For /api/status. */
  figures(): { enabled: boolean; store: 'redis' | 'memory' | null; dropped: number } {
    const c = this.#collector
    return { enabled: c !== null, store: c?.storeKind ?? null, dropped: c?.dropped ?? 0 }
  }

  /** Writes the workers' last statistics, waiting at most CLOSE_FLUSH_MS. */
  async close(): Promise<void> {
    clearInterval(this.#timer)
    if (this.#collector === null) return
    let timer: NodeJS.Timeout | undefined
    await Promise.race([this.#collector.flush(), new Promise<void>((r) => (timer = setTimeout(r, CLOSE_FLUSH_MS)))])
    clearTimeout(timer)
  }
}
