import { Counter, Gauge, Histogram, type Registry } from 'prom-client'
import { PendingCounts } from '../metrics.js'

/** How a request went through the cache. */
export type CacheResult = 'hit' | 'stale' | 'miss' | 'bypass' | 'revalidated'
/** Which tier answered (upstream for a miss or a revalidation, none for a bypass). */
export type CacheTier = 'l1' | 'l2' | 'upstream' | 'none'

/** The cache's Prometheus metrics (per worker; the primary sums them). */
export class CacheMetrics {
  readonly #requests = new PendingCounts<'result' | 'tier'>()
  readonly l2Duration: Histogram
  readonly l2Errors: Counter
  readonly collapsed: Counter
  #sizes: () => { bytes: number; entries: number } = () => ({ bytes: 0, entries: 0 })

  constructor(registry: Registry) {
    const requests = this.#requests
    new Counter({
      name: 'meliproxy_cache_requests_total',
      help: 'Requests by cache result (hit, stale, miss, bypass, revalidated) and the tier that answered',
      labelNames: ['result', 'tier'],
      registers: [registry],
      collect() {
        requests.flushInto(this)
      },
    })
    this.l2Duration = new Histogram({
      name: 'meliproxy_cache_l2_duration_seconds',
      help: 'Time of an L2 (Redis) lookup',
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
      registers: [registry],
    })
    this.l2Errors = new Counter({
      name: 'meliproxy_cache_l2_errors_total',
      help: 'L2 (Redis) operations that failed; each counts as a miss or a skipped store',
      registers: [registry],
    })
    this.collapsed = new Counter({
      name: 'meliproxy_cache_collapsed_total',
      help: 'Requests that waited for another request fetching the same URL instead of going upstream',
      registers: [registry],
    })
    const self = this
    new Gauge({
      name: 'meliproxy_cache_l1_bytes',
      help: 'Bytes held by the in-process L1 cache',
      registers: [registry],
      collect() {
        this.set(self.#sizes().bytes)
      },
    })
    new Gauge({
      name: 'meliproxy_cache_l1_entries',
      help: 'URLs held by the in-process L1 cache',
      registers: [registry],
      collect() {
        this.set(self.#sizes().entries)
      },
    })
  }

  /** Tells the gauges where to read L1's size. */
  sizes(read: () => { bytes: number; entries: number }): void {
    this.#sizes = read
  }

  /** Counts one request's cache outcome. */
  request(result: CacheResult, tier: CacheTier): void {
    this.#requests.add(result + tier, () => ({ result, tier }))
  }
}
