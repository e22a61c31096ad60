import type { RedisClient } from '../redis/cluster.js'
import { deepFreeze, type Config } from '../config.js'
import { ErrorCodes, MeliproxyError } from '../errors.js'
import type { Logger } from '../log.js'
import { BUCKET_PREFIX, LIMITS_RESET_CHANNEL, RULES_CHANNEL } from '../redis/keys.js'
import { FALLBACK_PREFIX } from './limiter.js'
import type { MemoryPool } from './pool.js'
import {
  compileVersion,
  configVersion,
  MemoryRuleStore,
  parseLimitsReset,
  RedisRuleStore,
  type CompiledVersion,
  type RuleSetDoc,
  type RuleStore,
  type RuleVersion,
} from './rule-store.js'
import { CompiledRule, generationOf } from './rules.js'
import type { Generations } from './types.js'

/**
 * The primary's rules controller: which rule set this instance enforces, and where it comes from. Version 0 is the
 * config file's (re-read on SIGHUP); the admin API stores newer ones (in Redis, shared by every instance, announced on
 * a channel); a stored set wins over the file until rolled back to version 0. It also resets counters: a whole rule by
 * starting its next generation (part of every bucket key of the rule: one step for the fleet, nothing scanned), one
 * bucket by deleting its key; and every worker then drops its leases of the old counters.
 *
 * With Redis it re-reads the stored rule set and generations whenever either connection (re)connects and every
 * RESYNC_MS: a change announced while this instance could not hear it (its subscriber reconnecting) is picked up.
 */

/** How often an instance with Redis reads the stored rule set and generations again, whatever the channels said. */
export const RESYNC_MS = 5_000

/** What the controller asks of the primary. */
export interface RulesControllerDeps {
  /** The primary's Redis connection (null without Redis). */
  readonly redis: RedisClient | null
  /** A connection for the channels (null without Redis). */
  readonly subscriber: RedisClient | null
  /** The instance's own pool (embedded mode, and the fallback), whose counters a reset of one bucket clears. */
  readonly pool: MemoryPool
  readonly log: Logger
  /** Every worker of this instance should enforce `rules` (with the controller's `generations`) from now on. */
  apply(rules: CompiledVersion): void
  /**
   * A rule's counters were reset (`bucket` null): every worker of this instance moves the rule to `generation` and
   * drops its leases of the old one. Or one bucket's: every worker drops its leases of that key.
   */
  dropLeases(rule: string, bucket: string | null, generation: number): void
}

/** What a reset did. */
export interface ResetResult {
  /** The rule's generation now: a whole-rule reset starts the next one. */
  readonly generation: number
  /** A reset of one bucket: the counters deleted (0 when it held none). */
  readonly cleared?: number
}

export class RulesController {
  readonly #deps: RulesControllerDeps
  readonly #store: RuleStore
  #file: RuleVersion
  #current: CompiledVersion
  #generations: Generations = Object.freeze({})
  #ipv6Prefix: number
  /** Resets heard on the channel: a sync whose read overlapped one keeps the newer generation. */
  #heard = 0
  readonly #resync: NodeJS.Timeout | null

  constructor(config: Config, deps: RulesControllerDeps) {
    this.#deps = deps
    this.#store = deps.redis !== null ? new RedisRuleStore(deps.redis) : new MemoryRuleStore()
    this.#file = configVersion(config.limits, config.allow, config.deny)
    this.#current = { version: this.#file, limits: config.limits, allow: config.allow, deny: config.deny }
    this.#ipv6Prefix = config.limitIpv6Prefix
    const subscriber = deps.subscriber
    subscriber?.subscribe(RULES_CHANNEL, LIMITS_RESET_CHANNEL).catch(() => {})
    subscriber?.on('message', (channel: string, text: string) => {
      if (channel === RULES_CHANNEL) return void this.sync()
      if (channel !== LIMITS_RESET_CHANNEL) return // the connection carries other owners' channels too
      let reset
      try {
        reset = parseLimitsReset(text)
      } catch {
        return deps.log.warn('ignored a malformed limits-reset message')
      }
      this.#heard++
      this.#resetHeard(reset.rule, reset.bucket, reset.generation)
    })
    // On every (re)connect of either connection, and every RESYNC_MS: a change made while this instance could not
    // hear it is picked up. The subscriber is subscribed again first (ioredis says 'ready' before it re-subscribes),
    // so nothing announced after the read can be missed.
    deps.redis?.on('ready', () => void this.sync())
    subscriber?.on('ready', () => {
      subscriber.subscribe(RULES_CHANNEL, LIMITS_RESET_CHANNEL).then(() => this.sync(), () => {})
    })
    this.#resync = deps.redis === null ? null : setInterval(() => void this.sync(), RESYNC_MS)
    this.#resync?.unref()
  }

  /** The rule set in force. */
  get current(): CompiledVersion {
    return this.#current
  }

  /** Each rule's generation in force here (part of its bucket keys). */
  get generations(): Generations {
    return this.#generations
  }

  /** A config file re-read on SIGHUP: its rules take over unless a stored set is in force. Returns the config to run. */
  reload(next: Config): Config {
    this.#file = configVersion(next.limits, next.allow, next.deny)
    this.#ipv6Prefix = next.limitIpv6Prefix
    if (this.#current.version.version > 0) {
      this.#deps.log.info('reload keeps the rule set stored through the admin API', { version: this.#current.version.version })
      return withRules(next, this.#current)
    }
    this.#current = { version: this.#file, limits: next.limits, allow: next.allow, deny: next.deny }
    return next
  }

  /** Applies the stored rule set and generations where they differ from those in force. */
  async sync(): Promise<void> {
    const redis = this.#deps.redis
    if (redis !== null && redis.status !== 'ready') return // its 'ready' syncs
    const heard = this.#heard
    try {
      const [stored, generations] = await Promise.all([this.#store.current(), this.#store.generations()])
      // A reset heard while reading may be newer than what was read; otherwise what is stored is the truth (a Redis
      // that lost the hash sends every instance back to the same generation).
      const next = this.#heard === heard ? generations : newest(generations, this.#generations)
      const moved = !sameGenerations(next, this.#generations)
      if (moved) this.#generations = Object.freeze(next)
      if (stored !== null && stored.version !== this.#current.version.version) this.#apply(compileVersion(stored))
      else if (moved) {
        this.#deps.log.info('rule generations read from the store', { generations: next })
        this.#deps.apply(this.#current)
      }
    } catch (err) {
      this.#deps.log.warn('could not read the stored rule set; the current one stays', { error: (err as Error).message })
    }
  }

  /** Stores a new rule set (already validated) and applies it; every other instance hears of it on the channel. */
  async put(doc: RuleSetDoc, source: RuleVersion['source']): Promise<RuleVersion> {
    let stored: RuleVersion
    try {
      stored = await this.#store.put(doc, source)
    } catch (err) {
      throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, `the rule set could not be stored: ${(err as Error).message}`)
    }
    this.#apply(compileVersion(stored))
    return stored
  }

  /** Stored versions, newest first, then the config file's (version 0). */
  async history(): Promise<RuleVersion[]> {
    try {
      return [...(await this.#store.history()), this.#file]
    } catch (err) {
      throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, `the history could not be read: ${(err as Error).message}`)
    }
  }

  /**
   * Resets a rule's counters everywhere: its next generation (one HINCRBY with Redis, announced in the same step).
   * With `values` (its `per` values, one per entry of `per`), only that bucket's: one DEL (and the entry of this
   * instance's own pool). Every worker of every instance then drops its leases of them (through the channel with
   * Redis, which reaches this instance too; directly without).
   */
  async reset(rule: string, values: readonly string[] | null): Promise<ResetResult> {
    const { redis, log } = this.#deps
    if (redis !== null && redis.status !== 'ready') {
      throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, 'Redis is not reachable: counters there were not reset')
    }
    if (values !== null) return this.#resetBucket(rule, values)
    let generation: number
    try {
      generation = await this.#store.newGeneration(rule)
    } catch (err) {
      throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, `the rule's counters were not reset: ${(err as Error).message}`)
    }
    // In force here at once (this instance's own announcement then changes nothing).
    this.#resetHeard(rule, null, generation)
    log.info('limit counters reset', { rule, generation })
    return { generation }
  }

  /** Stops the periodic re-sync (the primary is closing). */
  close(): void {
    if (this.#resync !== null) clearInterval(this.#resync)
  }

  async #resetBucket(rule: string, values: readonly string[]): Promise<ResetResult> {
    const { redis, pool, log } = this.#deps
    const spec = this.#current.limits.find((r) => r.name === rule)
    if (spec === undefined) throw new MeliproxyError(ErrorCodes.NOT_FOUND, `rule: "${rule}" is not a rule in force`, 'rule')
    const generation = generationOf(this.#generations, rule)
    const bucket = new CompiledRule(spec, generation, this.#ipv6Prefix).keyOf(values)
    let cleared = pool.reset(rule, bucket) + pool.reset(FALLBACK_PREFIX + rule, FALLBACK_PREFIX + bucket)
    if (redis === null) {
      this.#deps.dropLeases(rule, bucket, generation)
      return { generation, cleared }
    }
    try {
      cleared += await redis.del(BUCKET_PREFIX + bucket)
      await redis.publish(LIMITS_RESET_CHANNEL, JSON.stringify({ rule, bucket, generation }))
    } catch (err) {
      throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, `the bucket was not reset: ${(err as Error).message}`)
    }
    log.info('limit counters reset', { rule, bucket, cleared })
    return { generation, cleared }
  }

  /** A reset announced (or made here): a rule's newer generation takes over; a bucket's leases are dropped. */
  #resetHeard(rule: string, bucket: string | null, generation: number): void {
    if (bucket !== null) return this.#deps.dropLeases(rule, bucket, generation)
    if (generation <= generationOf(this.#generations, rule)) return // in force already
    this.#generations = Object.freeze({ ...this.#generations, [rule]: generation })
    this.#deps.dropLeases(rule, null, generation)
  }

  #apply(next: CompiledVersion): void {
    this.#current = next
    this.#deps.apply(next)
    this.#deps.log.info('rules applied', { version: next.version.version, source: next.version.source, rules: next.limits.length })
  }
}

/** Per rule, the higher generation of the two. */
function newest(a: Generations, b: Generations): Generations {
  return Object.fromEntries([...Object.entries(a), ...Object.entries(b).filter(([rule, n]) => n > generationOf(a, rule))])
}

function sameGenerations(a: Generations, b: Generations): boolean {
  const keys = Object.keys(a)
  return keys.length === Object.keys(b).length && keys.every((k) => generationOf(b, k) === a[k])
}

/** The config with another rule set in force. */
export function withRules(config: Config, rules: CompiledVersion): Config {
  return deepFreeze({ ...config, limits: rules.limits, allow: rules.allow, deny: rules.deny })
}
