import { ConfigError } from '../errors.js'
import type { Cidr } from '../net/ip.js'
import { parseIpList, parseRules } from './spec.js'
import type { Generations, RuleSpec } from './types.js'
import { isCluster, type RedisClient } from '../redis/cluster.js'
import {
  CLUSTER_RULES_CURRENT_KEY,
  CLUSTER_RULES_HISTORY_KEY,
  CLUSTER_RULES_VERSION_KEY,
  LIMITS_RESET_CHANNEL,
  RULES_CHANNEL,
  RULES_CURRENT_KEY,
  RULES_GENERATIONS_KEY as GENERATIONS_KEY,
  RULES_HISTORY_KEY,
  RULES_VERSION_KEY,
} from '../redis/keys.js'

/**
 * The versioned rule set behind the admin API: `PUT /api/limits` stores a new version, `GET /api/limits/history` lists
 * them, a rollback stores an old one again as a new version. With Redis the versions live there (a restart keeps
 * them; every instance applies a change within a second through pub/sub); without Redis they live in the primary.
 * Version 0 is the rule set of the config file, in force until the API sets one.
 *
 * It also keeps each rule's generation: how many times its counters were reset. The generation is part of every
 * bucket key of the rule (src/limiter/rules.ts), so a reset is one increment: the old counts are never read again and
 * expire with their windows.
 */

/** A rule as the config file and the API write it (RuleSpec without derived fields). */
export type FileRule = Readonly<Record<string, unknown>> & { readonly name: string }

/** A rule set as the API and the config file write it. */
export interface RuleSetDoc {
  readonly limits: readonly FileRule[]
  readonly allow: readonly string[]
  readonly deny: readonly string[]
}

/** One stored version. */
export interface RuleVersion extends RuleSetDoc {
  readonly version: number
  readonly updatedAt: string
  readonly source: 'config' | 'api' | 'rollback'
}

/** A version ready to enforce. */
export interface CompiledVersion {
  readonly version: RuleVersion
  readonly limits: readonly RuleSpec[]
  readonly allow: readonly Cidr[]
  readonly deny: readonly Cidr[]
}

const DOC_KEYS = new Set(['limits', 'allow', 'deny'])
const HISTORY_KEEP = 100

/** Validates a rule set exactly as the config file's `limits`, `allow` and `deny` are; throws ConfigError. */
export function parseRuleSetDoc(raw: unknown): { doc: RuleSetDoc; rules: RuleSpec[]; allow: Cidr[]; deny: Cidr[] } {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ConfigError('body', 'must be a JSON object with limits (and optionally allow, deny)')
  }
  const obj = raw as Record<string, unknown>
  for (const k of Object.keys(obj)) {
    if (!DOC_KEYS.has(k)) throw new ConfigError(k, 'unknown field (expected limits, allow, deny)')
  }
  if (obj.limits === undefined) throw new ConfigError('limits', 'is required (an empty list removes every limit)')
  const limits = parseRules(obj.limits)
  const allow = parseIpList(obj.allow, 'allow')
  const deny = parseIpList(obj.deny, 'deny')
  return { doc: { limits: limits.map(fileRule), allow: allow.map(cidrText), deny: deny.map(cidrText) }, rules: limits, allow, deny }
}

/** A CIDR as text (`a.b.c.d/n`). */
export function cidrText(c: Cidr): string {
  return `${c.address}/${c.prefix}`
}

/** A stored version made enforceable (its text was validated when stored; a bad one throws). */
export function compileVersion(v: RuleVersion): CompiledVersion {
  const parsed = parseRuleSetDoc({ limits: v.limits, allow: v.allow, deny: v.deny })
  return { version: v, limits: parsed.rules, allow: parsed.allow, deny: parsed.deny }
}

/** A rule as the config file writes it (no derived fields). */
export function fileRule(r: RuleSpec): FileRule {
  const out: Record<string, unknown> & { name: string } = { name: r.name, limit: r.limit, window: r.window }
  if (Object.keys(r.match).length > 0) out.match = r.match
  if (r.per.length > 0) out.per = r.per
  // The rule features, where they are not the defaults (so a rule set written without them reads back the same).
  if (r.algorithm !== 'fixed') out.algorithm = r.algorithm
  if (r.algorithm === 'token-bucket' && r.burst !== r.limit) out.burst = r.burst
  if (r.mode !== 'enforce') out.mode = r.mode
  if (r.cost !== 1) out.cost = r.cost
  if (r.onExceed !== 'reject') {
    out.onExceed = r.onExceed
    out.maxDelay = r.maxDelay
  }
  if (r.whenRedisDown !== 'local') out.whenRedisDown = r.whenRedisDown
  return out
}

/** Version 0: the config file's rules. */
export function configVersion(limits: readonly RuleSpec[], allow: readonly Cidr[], deny: readonly Cidr[]): RuleVersion {
  return {
    version: 0,
    updatedAt: new Date().toISOString(),
    source: 'config',
    limits: limits.map(fileRule),
    allow: allow.map(cidrText),
    deny: deny.map(cidrText),
  }
}

export interface RuleStore {
  /** The latest stored version, or null when the API never set one. */
  current(): Promise<RuleVersion | null>
  /** Stores a new version and returns it. */
  put(doc: RuleSetDoc, source: RuleVersion['source']): Promise<RuleVersion>
  /** Stored versions, newest first. */
  history(): Promise<RuleVersion[]>
  /** Every rule's generation (a rule never reset is absent). */
  generations(): Promise<Generations>
  /** Starts a new generation of a rule's counters, announces it (with Redis, on the limits-reset channel), returns it. */
  newGeneration(rule: string): Promise<number>
}

/** A message of the limits-reset channel: a rule's new generation, or one bucket (`bucket`) deleted. */
export interface LimitsReset {
  readonly rule: string
  readonly bucket: string | null
  readonly generation: number
}

/** Reads a limits-reset message; throws on one that is not (another version's, or garbage). */
export function parseLimitsReset(text: string): LimitsReset {
  const m = JSON.parse(text) as Partial<LimitsReset> | null
  if (typeof m?.rule !== 'string' || (m.bucket !== null && typeof m.bucket !== 'string') || !Number.isSafeInteger(m.generation)) {
    throw new Error('not a limits-reset message')
  }
  return { rule: m.rule, bucket: m.bucket, generation: m.generation! }
}

/** Versions in the primary's memory (no Redis): this instance only, gone at restart. */
export class MemoryRuleStore implements RuleStore {
  readonly #versions: RuleVersion[] = []

  async current(): Promise<RuleVersion | null> {
    return this.#versions[0] ?? null
  }

  async put(doc: RuleSetDoc, source: RuleVersion['source']): Promise<RuleVersion> {
    const v: RuleVersion = { version: (this.#versions[0]?.version ?? 0) + 1, updatedAt: new Date().toISOString(), source, ...doc }
    this.#versions.unshift(v)
    this.#versions.length = Math.min(this.#versions.length, HISTORY_KEEP)
    return v
  }

  async history(): Promise<RuleVersion[]> {
    return [...this.#versions]
  }

  readonly #generations = new Map<string, number>()

  async generations(): Promise<Generations> {
    return Object.fromEntries(this.#generations)
  }

  async newGeneration(rule: string): Promise<number> {
    const n = (this.#generations.get(rule) ?? 0) + 1
    this.#generations.set(rule, n)
    return n
  }
}

/*
 * KEYS: version counter, current, history. ARGV: the version's JSON without its version field (an object text),
 * history length, channel. The version number is taken and written in one script, so concurrent PUTs on two
 * instances cannot leave an older version current.
 */
const PUT_SCRIPT = `
local v = redis.call('INCR', KEYS[1])
local text = '{"version":' .. v .. ',' .. string.sub(ARGV[1], 2)
redis.call('SET', KEYS[2], text)
redis.call('LPUSH', KEYS[3], text)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
redis.call('PUBLISH', ARGV[3], v)
return text
`

/*
 * KEYS: the generations hash. ARGV: rule, channel. The increment and its announcement in one step: no instance can
 * read the new generation without the message having gone out, nor the reverse. (A re-sent script after a dropped
 * connection would skip a generation: harmless, each is a fresh start.)
 */
const GENERATION_SCRIPT = `
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PUBLISH', ARGV[2], cjson.encode({ rule = ARGV[1], bucket = cjson.null, generation = n }))
return n
`

/** Versions in Redis, shared by every instance. */
export class RedisRuleStore implements RuleStore {
  readonly #redis: RedisClient
  readonly #keys: { readonly version: string; readonly current: string; readonly history: string }

  constructor(redis: RedisClient) {
    this.#redis = redis
    this.#keys = isCluster(redis)
      ? { version: CLUSTER_RULES_VERSION_KEY, current: CLUSTER_RULES_CURRENT_KEY, history: CLUSTER_RULES_HISTORY_KEY }
      : { version: RULES_VERSION_KEY, current: RULES_CURRENT_KEY, history: RULES_HISTORY_KEY }
    redis.defineCommand('meliproxyPutRules', { numberOfKeys: 3, lua: PUT_SCRIPT })
    redis.defineCommand('meliproxyNewGeneration', { numberOfKeys: 1, lua: GENERATION_SCRIPT })
  }

  async current(): Promise<RuleVersion | null> {
    const text = await this.#redis.get(this.#keys.current)
    return text === null ? null : (JSON.parse(text) as RuleVersion)
  }

  async put(doc: RuleSetDoc, source: RuleVersion['source']): Promise<RuleVersion> {
    const body = JSON.stringify({ updatedAt: new Date().toISOString(), source, ...doc })
    const put = (this.#redis as unknown as { meliproxyPutRules: (...a: (string | number)[]) => Promise<string> }).meliproxyPutRules
    const text = await put.call(this.#redis, this.#keys.version, this.#keys.current, this.#keys.history, body, HISTORY_KEEP, RULES_CHANNEL)
    return JSON.parse(text) as RuleVersion
  }

  async history(): Promise<RuleVersion[]> {
    const list = await this.#redis.lrange(this.#keys.history, 0, HISTORY_KEEP - 1)
    return list.map((t) => JSON.parse(t) as RuleVersion)
  }

  async generations(): Promise<Generations> {
    const all = await this.#redis.hgetall(GENERATIONS_KEY)
    const out: [string, number][] = []
    for (const [rule, text] of Object.entries(all)) {
      const n = Number(text)
      if (Number.isSafeInteger(n) && n > 0) out.push([rule, n])
    }
    return Object.fromEntries(out)
  }

  async newGeneration(rule: string): Promise<number> {
    const bump = (this.#redis as unknown as { meliproxyNewGeneration: (...a: string[]) => Promise<number> }).meliproxyNewGeneration
    return bump.call(this.#redis, GENERATIONS_KEY, rule, LIMITS_RESET_CHANNEL)
  }
}
