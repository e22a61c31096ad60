import type { Logger } from '../log.js'
import { LeaseTable, type LeaseEvents, type TakeItem, type TakeResult } from './leases.js'
import type { LimiterMetrics } from './metrics.js'
import { shapeOf, type LeasePool } from './pool.js'
import type { RedisPool } from './redis-pool.js'
import type { Bucket, CompiledRule, RequestFacts, RuleSet } from './rules.js'

/**
 * The limiter a worker consults for every request: which buckets the request draws from (the rules), and the
 * leases that decide. With Redis, tokens are leased from Redis (exact across every instance); while Redis is
 * unusable, tokens already in hand are used up, then the instance falls back at once to leases from the primary's
 * pool, with each limit divided by the instance count so that the fleet total stays near the limit, and goes back
 * to Redis by itself. Without Redis, the primary's pool is the pool.
 */

/** The decision for one request governed by at least one rule. */
export interface Verdict {
  readonly allowed: boolean
  /** The rule that rejected the request, or the one nearest exhaustion. */
  readonly rule: CompiledRule
  /** The bucket that rejected it (the delay queue's key), or the one nearest exhaustion. */
  readonly bucket: string
  readonly remaining: number
  readonly resetMs: number
  /** Rejected because a `whenRedisDown: deny` rule cannot be counted (503, not 429). */
  readonly unavailable: boolean
}

/** After a Redis failure, how long requests skip Redis before one tries it again. */
const REDIS_RETRY_MS = 500
/** Buckets remembered as failing (Redis Cluster), at most; past it the expired ones are dropped. */
const FAILED_KEYS_PRUNE_AT = 10_000
export const FALLBACK_PREFIX = 'fallback:'

/** Where a Limiter leases tokens. */
export interface LimiterStores {
  /** Redis, when configured. */
  readonly redis: RedisPool | null
  /** The primary's pool: the main one without Redis, the fallback with it. */
  readonly primary: LeasePool
  /** Instances sharing the limits; fallback limits are divided by it. */
  readonly instances: number
  /** Workers per instance: with `instances`, how many holders share a pool. */
  readonly workers: number
}

/** Decides whether requests are within their limits. */
export class Limiter {
  #rules: RuleSet
  readonly #redis: RedisPool | null
  readonly #redisLeases: LeaseTable | null
  readonly #primaryLeases: LeaseTable
  readonly #instances: number
  readonly #metrics: LimiterMetrics
  readonly #log: Logger
  /** Until when requests skip Redis after a failure (on a cluster: until when the limiter counts as degraded). */
  #redisSkipUntil = 0
  /**
   * On a Redis Cluster a failure skips Redis only for the buckets of the failed call (bucket key -> until when): their
   * master may be the only one away (killed, failing over), and every other bucket keeps counting on its own master.
   * Null on one Redis, where a failure skips every bucket.
   */
  readonly #failedKeys: Map<string, number> | null
  /** On a cluster, until when every bucket skips Redis: too many failed at once to remember each. */
  #skipAllUntil = 0

  constructor(rules: RuleSet, stores: LimiterStores, metrics: LimiterMetrics, log: Logger) {
    this.#rules = rules
    this.#metrics = metrics
    this.#log = log
    this.#instances = stores.instances
    this.#redis = stores.redis
    this.#failedKeys = stores.redis?.perKeyFailures === true ? new Map() : null
    const events = (pool: string): LeaseEvents => ({
      leased: (n) => metrics.leased(pool, n),
      returned: (n) => metrics.returned(pool, n),
    })
    this.#redisLeases = stores.redis === null ? null : new LeaseTable(stores.redis, stores.instances * stores.workers, events('redis'))
    // The primary's pool is never bypassed: when it does not answer, only tokens in hand admit (never open).
    this.#primaryLeases = new LeaseTable(stores.primary, stores.workers, { ...events('primary'), unavailable: () => metrics.unavailable.inc() }, { offline: true })
  }

  /** The rule set in force. */
  get rules(): RuleSet {
    return this.#rules
  }

  /** Replaces the rule set (the internal API behind SIGHUP and the admin API). Counters of kept names carry on. */
  replaceRules(rules: RuleSet): void {
    this.#rules = rules
    this.#redisLeases?.clearExhausted()
    this.#primaryLeases.clearExhausted()
  }

  /** The limiter's metrics (the delay queues count there too). */
  get metrics(): LimiterMetrics {
    return this.#metrics
  }

  /**
   * Null when no enforced rule governs the request; otherwise the verdict, synchronous when the tokens were in hand.
   * Shadow rules count the request too (once: not again when a delayed request is decided again, `again`).
   */
  check(facts: RequestFacts & { shadowLimitedBy?: string | undefined; finished?: boolean }, again = false): Verdict | Promise<Verdict> | null {
    if (!again) {
      const shadow = this.#rules.shadowBucketsFor(facts)
      if (shadow.length > 0) this.#shadow(shadow, facts)
    }
    const buckets = this.#rules.bucketsFor(facts)
    if (buckets.length === 0) return null
    const result = this.#take(buckets)
    if (!(result instanceof Promise)) return this.#verdict(buckets, result, !again)
    const started = performance.now()
    return result.then((r) => {
      this.#metrics.duration.observe((performance.now() - started) / 1000)
      return this.#verdict(buckets, r, !again)
    })
  }

  /** Counts a request against the shadow rules only: one refused before its first `check` (queued, then refused). */
  countShadow(facts: RequestFacts & { shadowLimitedBy?: string | undefined; finished?: boolean }): void {
    const shadow = this.#rules.shadowBucketsFor(facts)
    if (shadow.length > 0) this.#shadow(shadow, facts)
  }

  /**
   * Counts a request against the shadow rules, apart from the enforced ones (so a shadow rule never makes another
   * reject): the outcome goes to the metrics (`shadow_allowed`, `shadow_limited`) and, while the request is not
   * finished, to its `shadowLimitedBy` (statistics, access log); the request never waits for it.
   */
  #shadow(buckets: readonly Bucket[], x: { shadowLimitedBy?: string | undefined; finished?: boolean }): void {
    for (const b of buckets) {
      const r = this.#take([b])
      const record = (t: TakeResult): void => {
        this.#metrics.decision(b.rule, t.allowed)
        if (!t.allowed && x.finished !== true) x.shadowLimitedBy ??= b.rule.name
      }
      if (r instanceof Promise) void r.then(record, () => {})
      else record(r)
    }
  }

  /** Drops the leases of a rule (or of one bucket) whose counters were reset: the pool starts them afresh. */
  forget(rule: string, bucket: string | null): void {
    this.#redisLeases?.forget(rule, bucket)
    this.#primaryLeases.forget(rule, bucket)
    this.#primaryLeases.forget(rule, bucket, FALLBACK_PREFIX)
  }

  /** Gives back tokens not needed any more (run every SWEEP_MS of src/limiter/leases.ts). */
  sweep(): void {
    const started = performance.now()
    this.#redisLeases?.sweep()
    this.#primaryLeases.sweep()
    this.#metrics.swept(performance.now() - started, (this.#redisLeases?.size ?? 0) + this.#primaryLeases.size)
  }

  /** Gives every unused token back (the worker is exiting). */
  releaseAll(): void {
    this.#redisLeases?.releaseAll()
    this.#primaryLeases.releaseAll()
  }

  #take(items: readonly Bucket[]): TakeResult | Promise<TakeResult> {
    const leases = this.#redisLeases
    if (leases === null) return this.#primaryLeases.take(items)
    if (this.#redis!.ready && !this.#skipsRedis(items)) {
      const result = leases.take(items)
      if (!(result instanceof Promise)) return result
      return result.then(
        (r) => {
          // On a cluster, other buckets may still be failing: back on Redis once none failed for a retry period.
          if (this.#metrics.isDegraded && Date.now() >= this.#redisSkipUntil) {
            this.#metrics.recovered()
            this.#log.info('limiter back on redis')
          }
          return r
        },
        (err: Error) => {
          this.#metrics.redisErrors.inc()
          this.#skipRedis(items)
          return this.#fallback(items, err.message)
        },
      )
    }
    // Redis is unusable: tokens already leased from it are still good for their window.
    return leases.takeLocal(items) ?? this.#fallback(items, this.#redis!.ready ? 'redis failed a moment ago' : 'redis is not connected')
  }

  /** True while these buckets skip Redis after a failure (all of them on one Redis; on a cluster, these ones). */
  #skipsRedis(items: readonly Bucket[]): boolean {
    const failed = this.#failedKeys
    if (failed === null) return Date.now() < this.#redisSkipUntil
    if (failed.size === 0) return false
    const now = Date.now()
    if (now < this.#skipAllUntil) return true // (the map holds the failure that set it: never empty then)
    for (let i = 0; i < items.length; i++) {
      const until = failed.get(items[i]!.key)
      if (until !== undefined && now < until) return true
    }
    return false
  }

  #skipRedis(items: readonly Bucket[]): void {
    const until = Date.now() + REDIS_RETRY_MS
    this.#redisSkipUntil = until
    const failed = this.#failedKeys
    if (failed === null) return
    if (failed.size >= FAILED_KEYS_PRUNE_AT) {
      for (const [key, at] of failed) if (at <= until - REDIS_RETRY_MS) failed.delete(key)
      // Still more than half full: that many buckets failed within a retry period, as good as all of them. Skipping
      // every bucket for one (the one-Redis rule) keeps the map bounded and this walk rare (not one per request).
      if (failed.size >= FAILED_KEYS_PRUNE_AT / 2) {
        failed.clear()
        this.#skipAllUntil = until
      }
    }
    for (const b of items) failed.set(b.key, until)
  }

  /**
   * Redis is unusable: each rule as its `whenRedisDown` says. `deny` refuses (503); `allow` drops the rule for this
   * request; `local` leases from this instance's pool at floor(limit / instances) (burst likewise for a token
   * bucket), so the fleet never admits more than the limit from these shares; a rule whose share is below its cost
   * refuses until Redis is back.
   */
  #fallback(items: readonly Bucket[], reason: string): TakeResult | Promise<TakeResult> {
    if (!this.#metrics.isDegraded) this.#log.warn('limiter falling back to the local pool', { reason })
    this.#metrics.degraded()
    this.#metrics.fallbacks.inc()
    const denied = items.findIndex((b) => b.rule.whenRedisDown === 'deny')
    if (denied !== -1) return { allowed: false, failed: denied, resetMs: REDIS_RETRY_MS, unavailable: true }
    const n = this.#instances
    const kept: number[] = []
    const scaled: TakeItem[] = []
    for (let i = 0; i < items.length; i++) {
      const it = items[i]!
      if (it.rule.whenRedisDown === 'allow') continue
      const limit = Math.floor(it.limit / n)
      const burst = Math.floor(it.burst / n)
      if ((it.algorithm === 'token-bucket' ? burst : limit) < it.cost || limit < 1) {
        return { allowed: false, failed: i, resetMs: REDIS_RETRY_MS }
      }
      kept.push(i)
      scaled.push({
        key: FALLBACK_PREFIX + it.key,
        limit,
        windowMs: it.windowMs,
        algorithm: it.algorithm,
        burst,
        shape: shapeOf(it.algorithm, limit, it.windowMs, burst),
        cost: it.cost,
      })
    }
    if (scaled.length === 0) return { allowed: true, nearest: 0, remaining: items[0]!.limit, resetMs: REDIS_RETRY_MS }
    const back = (r: TakeResult): TakeResult => (r.allowed ? { ...r, nearest: kept[r.nearest]! } : { ...r, failed: kept[r.failed]! })
    const r = this.#primaryLeases.take(scaled)
    return r instanceof Promise ? r.then(back) : back(r)
  }

  /** The verdict of a take; `count`: into the decision metrics (a delayed request's retries count once, at the end). */
  #verdict(buckets: readonly Bucket[], result: TakeResult, count: boolean): Verdict {
    if (!result.allowed) {
      const b = buckets[result.failed]!
      if (count) this.#metrics.decision(b.rule, false)
      return { allowed: false, rule: b.rule, bucket: b.key, remaining: 0, resetMs: result.resetMs, unavailable: result.unavailable === true }
    }
    for (let i = 0; i < buckets.length; i++) this.#metrics.decision(buckets[i]!.rule, true)
    const b = buckets[result.nearest]!
    return { allowed: true, rule: b.rule, bucket: b.key, remaining: result.remaining, resetMs: result.resetMs, unavailable: false }
  }
}
