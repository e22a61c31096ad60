import { Counter, Gauge, Histogram, type Registry } from 'prom-client'
import { PendingCounts } from '../metrics.js'
import type { CompiledRule } from './rules.js'

/** The limiter's Prometheus metrics (per worker; the primary sums them). */
export class LimiterMetrics {
  readonly #decisions = new PendingCounts<'rule' | 'outcome'>()
  readonly duration: Histogram
  readonly fallbacks: Counter
  /** Requests refused because the primary's pool did not answer and no tokens were in hand. */
  readonly unavailable: Counter
  /** Requests of onExceed: delay rules that waited, by rule and outcome (admitted, rejected, queue_full). */
  readonly delayed: Counter<'rule' | 'outcome'>
  /** Requests waiting in a delay queue now. */
  readonly delayWaiting: Gauge
  readonly redisErrors: Counter
  #sweepMaxMs = 0
  #leaseBuckets = 0
  readonly #leases: Counter<'pool'>
  readonly #leasedTokens: Counter<'pool'>
  readonly #returnedTokens: Counter<'pool'>
  readonly #redisCalls: Counter<'op' | 'outcome'>
  #degradedSince: number | null = null
  #degradedMs = 0

  constructor(registry: Registry) {
    const decisions = this.#decisions
    new Counter({
      name: 'meliproxy_limiter_requests_total',
      help: 'Requests governed by a rule, by rule and outcome (allowed, limited; shadow rules: shadow_allowed, shadow_limited)',
      labelNames: ['rule', 'outcome'],
      registers: [registry],
      collect() {
        decisions.flushInto(this)
      },
    })
    this.duration = new Histogram({
      name: 'meliproxy_limiter_duration_seconds',
      help: 'Time to decide a request that waited for a lease (one decided from tokens in hand waits for nothing)',
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25],
      registers: [registry],
    })
    this.delayed = new Counter({
      name: 'meliproxy_limiter_delayed_total',
      help: 'Requests of onExceed: delay rules that were over the limit, by rule and outcome (admitted after waiting; rejected after maxDelay; too_long: refused at once, room could not come within maxDelay; queue_full)',
      labelNames: ['rule', 'outcome'],
      registers: [registry],
    })
    this.delayWaiting = new Gauge({
      name: 'meliproxy_limiter_delay_waiting',
      help: 'Requests waiting in a delay queue',
      registers: [registry],
    })
    this.fallbacks = new Counter({
      name: 'meliproxy_limiter_fallbacks_total',
      help: 'Decisions made on the local (per-instance) pool because Redis was unusable',
      registers: [registry],
    })
    const self = this
    new Gauge({
      name: 'meliproxy_limiter_lease_buckets',
      help: 'Buckets a worker holds leases of (summed over workers)',
      registers: [registry],
      collect() {
        this.set(self.#leaseBuckets)
      },
    })
    new Gauge({
      name: 'meliproxy_limiter_lease_sweep_max_seconds',
      help: "The longest a worker's lease sweep has held its event loop (the most of any worker)",
      aggregator: 'max',
      registers: [registry],
      collect() {
        this.set(self.#sweepMaxMs / 1000)
      },
    })
    this.unavailable = new Counter({
      name: 'meliproxy_limiter_unavailable_total',
      help: "Requests refused (503 limiter_unavailable) because the primary's pool did not answer and the worker had no tokens in hand",
      registers: [registry],
    })
    this.redisErrors = new Counter({
      name: 'meliproxy_limiter_redis_errors_total',
      help: 'Limiter calls to Redis that failed or timed out',
      registers: [registry],
    })
    this.#leases = new Counter({
      name: 'meliproxy_limiter_leases_total',
      help: 'Blocks of tokens leased from a pool (redis, or the primary), each one round trip',
      labelNames: ['pool'],
      registers: [registry],
    })
    this.#leasedTokens = new Counter({
      name: 'meliproxy_limiter_leased_tokens_total',
      help: 'Tokens leased from a pool',
      labelNames: ['pool'],
      registers: [registry],
    })
    this.#returnedTokens = new Counter({
      name: 'meliproxy_limiter_returned_tokens_total',
      help: 'Leased tokens given back to their pool unused',
      labelNames: ['pool'],
      registers: [registry],
    })
    this.#redisCalls = new Counter({
      name: 'meliproxy_limiter_redis_calls_total',
      help: 'Scripts the limiter ran in Redis, by operation (acquire, release) and outcome (ok, error)',
      labelNames: ['op', 'outcome'],
      registers: [registry],
    })
    new Counter({
      name: 'meliproxy_limiter_degraded_seconds_total',
      help: 'Time the limiter spent on the local fallback instead of Redis',
      registers: [registry],
      collect() {
        const ms = self.#degradedMs + (self.#degradedSince === null ? 0 : Date.now() - self.#degradedSince)
        self.#degradedMs = 0
        if (self.#degradedSince !== null) self.#degradedSince = Date.now()
        if (ms > 0) this.inc(ms / 1000)
      },
    })
  }

  /** A lease sweep took `ms` and left `buckets` buckets. */
  swept(ms: number, buckets: number): void {
    if (ms > this.#sweepMaxMs) this.#sweepMaxMs = ms
    this.#leaseBuckets = buckets
  }

  /** Counts a rule's outcome for one request (series made once per rule: nothing is built per request). */
  decision(rule: CompiledRule, allowed: boolean): void {
    const series = allowed ? rule.allowedSeries : rule.limitedSeries
    this.#decisions.addSeries(series.key, series.labels)
  }

  /** A lease of `tokens` was granted by `pool`. */
  leased(pool: string, tokens: number): void {
    this.#leases.labels(pool).inc()
    this.#leasedTokens.labels(pool).inc(tokens)
  }

  /** `tokens` went back to `pool` unused. */
  returned(pool: string, tokens: number): void {
    this.#returnedTokens.labels(pool).inc(tokens)
  }

  /** One script call in Redis. */
  call(op: 'acquire' | 'release', ok: boolean): void {
    this.#redisCalls.labels(op, ok ? 'ok' : 'error').inc()
  }

  /** Marks the start of a degraded stretch (idempotent). */
  degraded(): void {
    if (this.#degradedSince === null) this.#degradedSince = Date.now()
  }

  /** Marks its end (idempotent). */
  recovered(): void {
    if (this.#degradedSince === null) return
    this.#degradedMs += Date.now() - this.#degradedSince
    this.#degradedSince = null
  }

  /** True while degraded. */
  get isDegraded(): boolean {
    return this.#degradedSince !== null
  }
}

/** The lease figures the status API and the dashboard show, summed from the cluster's metrics text. */
export function leaseFigures(metricsText: string): { leases: number; leasedTokens: number; returnedTokens: number; redisCalls: number } {
  const sums = new Map<string, number>()
  for (const line of metricsText.split('\n')) {
    if (!line.startsWith('meliproxy_limiter_')) continue
    const end = line.search(/[{ ]/)
    const name = line.slice(0, end)
    sums.set(name, (sums.get(name) ?? 0) + Number(line.slice(line.lastIndexOf(' ') + 1)))
  }
  return {
    leases: sums.get('meliproxy_limiter_leases_total') ?? 0,
    leasedTokens: sums.get('meliproxy_limiter_leased_tokens_total') ?? 0,
    returnedTokens: sums.get('meliproxy_limiter_returned_tokens_total') ?? 0,
    redisCalls: sums.get('meliproxy_limiter_redis_calls_total') ?? 0,
  }
}
