import type { Redis } from 'ioredis'
import type { Config } from '../config.js'
import { ErrorCodes, MeliproxyError } from '../errors.js'
import type { Logger } from '../log.js'
import { LIMITS_RESET_CHANNEL, RULES_CHANNEL } from '../redis/keys.js'
import { FALLBACK_PREFIX } from './limiter.js'
import type { MemoryPool } from './pool.js'
import { resetBuckets } from './redis-pool.js'
import {
  compileVersion,
  configVersion,
  MemoryRuleStore,
  RedisRuleStore,
  type CompiledVersion,
  type RuleSetDoc,
  type RuleStore,
  type RuleVersion,
} from './rule-store.js'

/**
 * The primary's rules controller: which rule set this instance enforces, and where it comes from. Version 0 is the
 * config file's (re-read on SIGHUP); the admin API stores newer ones (in Redis, shared by every instance, announced on
 * a channel); a stored set wins over the file until rolled back to version 0. It also resets counters (here, in
 * Redis, and the leases every worker holds of them).
 */

/** What the controller asks of the primary. */
export interface RulesControllerDeps {
  /** The primary's Redis connection (null without Redis). */
  readonly redis: Redis | null
  /** A connection for the channels (null without Redis). */
  readonly subscriber: Redis | null
  /** The instance's own pool (embedded mode, and the fallback), whose counters a reset clears. */
  readonly pool: MemoryPool
  readonly log: Logger
  /** Every worker of this instance should enforce `rules` from now on. */
  apply(rules: CompiledVersion): void
  /** Every worker of this instance drops its leases of a reset rule (or bucket). */
  dropLeases(rule: string, bucket: string | null): void
}

export class RulesController {
  readonly #deps: RulesControllerDeps
  readonly #store: RuleStore
  #file: RuleVersion
  #current: CompiledVersion

  constructor(config: Config, deps: RulesControllerDeps) {
    this.#deps = deps
    this.#store = deps.redis !== null ? new RedisRuleStore(deps.redis) : new MemoryRuleStore()
    this.#file = configVersion(config.limits, config.allow, config.deny)
    this.#current = { version: this.#file, limits: config.limits, allow: config.allow, deny: config.deny }
    deps.subscriber?.subscribe(RULES_CHANNEL, LIMITS_RESET_CHANNEL).catch(() => {})
    deps.subscriber?.on('message', (channel: string, text: string) => {
      if (channel === RULES_CHANNEL) return void this.sync()
      if (channel !== LIMITS_RESET_CHANNEL) return // the connection carries other owners' channels too
      try {
        const { rule, bucket } = JSON.parse(text) as { rule: string; bucket: string | null }
        deps.dropLeases(rule, bucket)
      } catch {
        deps.log.warn('ignored a malformed limits-reset message')
      }
    })
    // On every (re)connect: a change made while this instance could not hear it is picked up.
    deps.redis?.on('ready', () => void this.sync())
  }

  /** The rule set in force. */
  get current(): CompiledVersion {
    return this.#current
  }

  /** A config file re-read on SIGHUP: its rules take over unless a stored set is in force. Returns the config to run. */
  reload(next: Config): Config {
    this.#file = configVersion(next.limits, next.allow, next.deny)
    if (this.#current.version.version > 0) {
      this.#deps.log.info('reload keeps the rule set stored through the admin API', { version: this.#current.version.version })
      return withRules(next, this.#current)
    }
    this.#current = { version: this.#file, limits: next.limits, allow: next.allow, deny: next.deny }
    return next
  }

  /** Applies the stored rule set when it differs from the one in force. */
  async sync(): Promise<void> {
    try {
      const stored = await this.#store.current()
      if (stored !== null && stored.version !== this.#current.version.version) this.#apply(compileVersion(stored))
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
   * Clears a rule's counters (or one bucket's) here and in Redis; every worker of every instance then drops its
   * leases of them (through the channel with Redis, which reaches this instance too; directly without).
   */
  async reset(rule: string, key: string | null): Promise<number> {
    const { redis, pool, log } = this.#deps
    const bucket = key === null ? undefined : `${rule}|${key}`
    let cleared = pool.reset(rule, bucket) + pool.reset(FALLBACK_PREFIX + rule, bucket && FALLBACK_PREFIX + bucket)
    if (redis === null) {
      this.#deps.dropLeases(rule, bucket ?? null)
      return cleared
    }
    if (redis.status !== 'ready') throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, 'Redis is not reachable: counters there were not reset')
    cleared += await resetBuckets(redis, rule, bucket)
    await redis.publish(LIMITS_RESET_CHANNEL, JSON.stringify({ rule, bucket: bucket ?? null }))
    log.info('limit counters reset', { rule, key, cleared })
    return cleared
  }

  #apply(next: CompiledVersion): void {
    this.#current = next
    this.#deps.apply(next)
    this.#deps.log.info('rules applied', { version: next.version.version, source: next.version.source, rules: next.limits.length })
  }
}

/** The config with another rule set in force. */
export function withRules(config: Config, rules: CompiledVersion): Config {
  return { ...config, limits: rules.limits, allow: rules.allow, deny: rules.deny }
}
