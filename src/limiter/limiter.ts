import type { Logger } from '../log.js'
import type { CounterStore, TakeItem, TakeResult } from './counter.js'
import type { LimiterMetrics } from './metrics.js'
import type { RedisCounter } from './redis-counter.js'
import type { Bucket, CompiledRule, RequestFacts, RuleSet } from './rules.js'

/**
 * The limiter a worker consults for every request: which buckets the request draws from (the rules), and the
 * counter that decides. With Redis, the counter is Redis (exact across every instance); while Redis is unusable it
 * falls back at once to the primary's counter, with each limit divided by the instance count so that the fleet total
 * stays near the limit, and goes back to Redis by itself. Without Redis, the primary's counter is the counter.
 */

/** The decision for one request governed by at least one rule. */
export interface Verdict {
  readonly allowed: boolean
  /** The rule that rejected the request, or the one nearest exhaustion. */
  readonly rule: CompiledRule
  readonly remaining: number
  readonly resetMs: number
}

/** After a Redis failure, how long requests skip Redis before one tries it again. */
const REDIS_RETRY_MS = 500
export const FALLBACK_PREFIX = 'fallback:'

/** Where a Limiter counts. */
export interface LimiterStores {
  /** Redis, when configured. */
  readonly redis: RedisCounter | null
  /** The primary's counter: the main one without Redis, the fallback with it. */
  readonly primary: CounterStore
  /** Instances sharing the limits; fallback limits are divided by it. */
  readonly instances: number
}

/** Decides whether requests are within their limits. */
export class Limiter {
  #rules: RuleSet
  readonly #stores: LimiterStores
  readonly #metrics: LimiterMetrics
  readonly #log: Logger
  #redisSkipUntil = 0

  constructor(rules: RuleSet, stores: LimiterStores, metrics: LimiterMetrics, log: Logger) {
    this.#rules = rules
    this.#stores = stores
    this.#metrics = metrics
    this.#log = log
  }

  /** The rule set in force. */
  get rules(): RuleSet {
    return this.#rules
  }

  /** Replaces the rule set (the internal API behind SIGHUP and the admin API). Counters of kept names carry on. */
  replaceRules(rules: RuleSet): void {
    this.#rules = rules
  }

  /** Null when no rule governs the request; otherwise the verdict. */
  check(facts: RequestFacts): Promise<Verdict> | null {
    const buckets = this.#rules.bucketsFor(facts)
    if (buckets.length === 0) return null
    const started = performance.now()
    const items: TakeItem[] = new Array(buckets.length)
    for (let i = 0; i < buckets.length; i++) {
      const b = buckets[i]!
      items[i] = { key: b.key, limit: b.rule.limit, windowMs: b.rule.windowMs }
    }
    return this.#take(items).then((result) => this.#verdict(buckets, result, started))
  }

  #take(items: TakeItem[]): Promise<TakeResult> {
    const redis = this.#stores.redis
    if (redis === null) return Promise.resolve(this.#stores.primary.take(items))
    if (redis.ready && Date.now() >= this.#redisSkipUntil) {
      return redis.take(items).then(
        (result) => {
          if (this.#metrics.isDegraded) {
            this.#metrics.recovered()
            this.#log.info('limiter back on redis')
          }
          return result
        },
        (err: Error) => {
          this.#metrics.redisErrors.inc()
          this.#redisSkipUntil = Date.now() + REDIS_RETRY_MS
          return this.#fallback(items, err.message)
        },
      )
    }
    return this.#fallback(items, redis.ready ? 'redis failed a moment ago' : 'redis is not connected')
  }

  #fallback(items: TakeItem[], reason: string): Promise<TakeResult> {
    if (!this.#metrics.isDegraded) this.#log.warn('limiter falling back to the local counter', { reason })
    this.#metrics.degraded()
    this.#metrics.fallbacks.inc()
    const n = this.#stores.instances
    const scaled = items.map((it) => ({
      key: FALLBACK_PREFIX + it.key,
      limit: Math.max(1, Math.floor(it.limit / n)),
      windowMs: it.windowMs,
    }))
    return Promise.resolve(this.#stores.primary.take(scaled))
  }

  #verdict(buckets: readonly Bucket[], result: TakeResult, started: number): Verdict {
    this.#metrics.duration.observe((performance.now() - started) / 1000)
    if (!result.allowed) {
      const rule = buckets[result.failed]!.rule
      this.#metrics.decision(rule.name, false)
      return { allowed: false, rule, remaining: 0, resetMs: result.resetMs }
    }
    let nearest = 0
    for (let i = 0; i < buckets.length; i++) {
      this.#metrics.decision(buckets[i]!.rule.name, true)
      if (result.remaining[i]! < result.remaining[nearest]!) nearest = i
    }
    return {
      allowed: true,
      rule: buckets[nearest]!.rule,
      remaining: result.remaining[nearest]!,
      resetMs: result.resetMs[nearest]!,
    }
  }
}
