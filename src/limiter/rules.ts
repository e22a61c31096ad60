import { createHash } from 'node:crypto'
import type { IncomingHttpHeaders } from 'node:http'
import { ConfigError } from '../errors.js'
import { clientNetwork, IpSet, parseCidr, type Cidr } from '../net/ip.js'
import { BadValue, duration, isHeaderName, MAX_DELAY, WINDOW } from '../values.js'
import { compilePathGlob, compileValueGlob } from './glob.js'
import { shapeOf } from './pool.js'
import type { Algorithm, Generations, PerKey, RuleSpec } from './types.js'

/**
 * Rate-limit rules: validation of the operator's text (config file, admin API) into plain RuleSpecs, and
 * compilation of RuleSpecs into matchers the hot path runs.
 *
 * A rule governs the requests its `match` selects (every listed criterion must hold; absent = every request).
 * `per` splits its budget into buckets by ip, path, method or header:<name>; absent = one shared bucket.
 */

const RULE_KEYS = new Set(['name', 'match', 'per', 'limit', 'window', 'algorithm', 'burst', 'mode', 'cost', 'onExceed', 'maxDelay', 'whenRedisDown'])
const ALGORITHMS: readonly Algorithm[] = ['fixed', 'sliding', 'token-bucket']
/** The longest a delayed request may wait: each one holds a socket. */
const DEFAULT_MAX_DELAY = '1s'
const MATCH_KEYS = new Set(['ip', 'path', 'method', 'header'])
const NAME = /^[A-Za-z0-9_.-]{1,64}$/
const METHOD = /^[A-Z]{1,16}$/

function strings(value: unknown, field: string): string[] {
  const list = Array.isArray(value) ? value : [value]
  if (list.length === 0) throw new ConfigError(field, 'must not be an empty list')
  return list.map((v) => {
    if (typeof v !== 'string' || v.trim() === '') throw new ConfigError(field, `${JSON.stringify(v)} is not a non-empty string`)
    return v.trim()
  })
}

function checkKeys(obj: Record<string, unknown>, allowed: Set<string>, field: string): void {
  for (const k of Object.keys(obj)) {
    if (!allowed.has(k)) throw new ConfigError(`${field}.${k}`, `unknown field (expected one of ${[...allowed].join(', ')})`)
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

/** A value in one of the grammars of src/values.ts, or a ConfigError naming the field. */
function parsed<T>(field: string, parse: () => T): T {
  try {
    return parse()
  } catch (err) {
    if (err instanceof BadValue) throw new ConfigError(field, err.message)
    throw err
  }
}

function parseRule(raw: unknown, index: number): RuleSpec {
  const at = `limits[${index}]`
  if (!isObject(raw)) throw new ConfigError(at, 'must be a mapping with name, limit and window')
  const name = raw.name
  if (typeof name !== 'string' || !NAME.test(name)) {
    throw new ConfigError(`${at}.name`, `${JSON.stringify(name)} is not a rule name (letters, digits, _ . -; up to 64)`)
  }
  const field = `limits[${index}] (${name})`
  checkKeys(raw, RULE_KEYS, field)

  const limit = raw.limit
  if (typeof limit !== 'number' || !Number.isInteger(limit) || limit <= 0) {
    throw new ConfigError(`${field}.limit`, `${JSON.stringify(limit)} is not a whole number above 0`)
  }
  if (raw.window === undefined) throw new ConfigError(`${field}.window`, 'is required (e.g. 1m)')
  const windowMs = parsed(`${field}.window`, () => duration(raw.window, WINDOW))
  // Whole seconds: RateLimit-Policy states the window as `w=<seconds>`, an integer.
  if (windowMs % 1_000 !== 0) throw new ConfigError(`${field}.window`, `${JSON.stringify(raw.window)} is not a whole number of seconds`)

  const match: { ip?: string[]; path?: string[]; method?: string[]; header?: Record<string, string> } = {}
  if (raw.match !== undefined) {
    if (!isObject(raw.match)) throw new ConfigError(`${field}.match`, 'must be a mapping of ip, path, method, header')
    checkKeys(raw.match, MATCH_KEYS, `${field}.match`)
    if (raw.match.ip !== undefined) {
      match.ip = strings(raw.match.ip, `${field}.match.ip`)
      for (const ip of match.ip) {
        const c = parseCidr(ip)
        if (typeof c === 'string') throw new ConfigError(`${field}.match.ip`, c)
      }
    }
    if (raw.match.path !== undefined) {
      match.path = strings(raw.match.path, `${field}.match.path`)
      for (const p of match.path) {
        const re = compilePathGlob(p)
        if (typeof re === 'string') throw new ConfigError(`${field}.match.path`, re)
      }
    }
    if (raw.match.method !== undefined) {
      match.method = strings(raw.match.method, `${field}.match.method`).map((m) => m.toUpperCase())
      for (const m of match.method) {
        if (!METHOD.test(m)) throw new ConfigError(`${field}.match.method`, `"${m}" is not an HTTP method`)
      }
    }
    if (raw.match.header !== undefined) {
      if (!isObject(raw.match.header)) throw new ConfigError(`${field}.match.header`, 'must be a mapping of header name to glob')
      match.header = {}
      for (const [h, g] of Object.entries(raw.match.header)) {
        if (!isHeaderName(h)) throw new ConfigError(`${field}.match.header`, `"${h}" is not a header name`)
        if (typeof g !== 'string') throw new ConfigError(`${field}.match.header.${h}`, `${JSON.stringify(g)} is not a glob string`)
        match.header[h.toLowerCase()] = g
      }
    }
  }

  let per: PerKey[] = []
  if (raw.per !== undefined) {
    per = strings(raw.per, `${field}.per`).map((p) => {
      if (p === 'ip' || p === 'path' || p === 'method') return p
      if (p.startsWith('header:') && isHeaderName(p.slice(7))) return `header:${p.slice(7).toLowerCase()}` as PerKey
      throw new ConfigError(`${field}.per`, `"${p}" is not one of ip, path, method, header:<name>`)
    })
  }
  return { name, match, per, limit, window: String(raw.window).trim(), windowMs, ...parseBehaviour(raw, field, limit) }
}

function oneOf<T extends string>(value: unknown, allowed: readonly T[], fallback: T, field: string): T {
  if (value === undefined) return fallback
  if (typeof value !== 'string' || !allowed.includes(value as T)) {
    throw new ConfigError(field, `${JSON.stringify(value)} is not one of ${allowed.join(', ')}`)
  }
  return value as T
}

function wholeAbove0(value: unknown, field: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value <= 0) {
    throw new ConfigError(field, `${JSON.stringify(value)} is not a whole number above 0`)
  }
  return value
}

/** The fields of a rule beyond what it matches and its limit: algorithm, burst, mode, cost, onExceed, whenRedisDown. */
function parseBehaviour(raw: Record<string, unknown>, field: string, limit: number) {
  const algorithm = oneOf(raw.algorithm, ALGORITHMS, 'fixed', `${field}.algorithm`)
  let burst = limit
  if (raw.burst !== undefined) {
    if (algorithm !== 'token-bucket') throw new ConfigError(`${field}.burst`, 'is only for algorithm: token-bucket')
    burst = wholeAbove0(raw.burst, `${field}.burst`)
  }
  const mode = oneOf(raw.mode, ['enforce', 'shadow'] as const, 'enforce', `${field}.mode`)

  // The most units one request may use: more than the bucket can ever hold would never be admitted.
  const most = algorithm === 'token-bucket' ? burst : limit
  const mostText = algorithm === 'token-bucket' ? `burst ${burst}` : `limit ${limit}`
  let cost: RuleSpec['cost'] = 1
  if (raw.cost !== undefined) {
    if (isObject(raw.cost)) {
      checkKeys(raw.cost, new Set(['header', 'max']), `${field}.cost`)
      const header = raw.cost.header
      if (typeof header !== 'string' || !isHeaderName(header)) {
        throw new ConfigError(`${field}.cost.header`, `${JSON.stringify(header)} is not a header name`)
      }
      if (raw.cost.max === undefined) throw new ConfigError(`${field}.cost.max`, 'is required with cost.header (the most one request may use)')
      const max = wholeAbove0(raw.cost.max, `${field}.cost.max`)
      if (max > most) throw new ConfigError(`${field}.cost.max`, `${max} is above the ${mostText}: such a request could never be admitted`)
      cost = { header: header.toLowerCase(), max }
    } else {
      cost = wholeAbove0(raw.cost, `${field}.cost`)
      if (cost > most) throw new ConfigError(`${field}.cost`, `${cost} is above the ${mostText}: no request could ever be admitted`)
    }
  }

  const onExceed = oneOf(raw.onExceed, ['reject', 'delay'] as const, 'reject', `${field}.onExceed`)
  if (onExceed === 'delay' && mode === 'shadow') throw new ConfigError(`${field}.onExceed`, 'a shadow rule never holds a request: use reject')
  if (raw.maxDelay !== undefined && onExceed !== 'delay') throw new ConfigError(`${field}.maxDelay`, 'is only for onExceed: delay')
  let maxDelay: string | null = null
  let maxDelayMs = 0
  if (onExceed === 'delay') {
    maxDelay = raw.maxDelay === undefined ? DEFAULT_MAX_DELAY : String(raw.maxDelay).trim()
    const written = maxDelay
    maxDelayMs = parsed(`${field}.maxDelay`, () => duration(written, MAX_DELAY))
  }
  const whenRedisDown = oneOf(raw.whenRedisDown, ['local', 'allow', 'deny'] as const, 'local', `${field}.whenRedisDown`)
  return { algorithm, burst, mode, cost, onExceed, maxDelay, maxDelayMs, whenRedisDown }
}

/** Validates a whole rule set (the `limits` list); throws ConfigError naming the rule and the field. */
export function parseRules(raw: unknown): RuleSpec[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) throw new ConfigError('limits', 'must be a list of rules')
  const rules = raw.map(parseRule)
  const seen = new Set<string>()
  for (const r of rules) {
    if (seen.has(r.name)) throw new ConfigError(`limits (${r.name}).name`, `duplicate rule name "${r.name}"`)
    seen.add(r.name)
  }
  return rules
}

/** Validates an allow or deny list of IPs/CIDRs. */
export function parseIpList(raw: unknown, field: string): Cidr[] {
  if (raw === undefined || raw === null || (Array.isArray(raw) && raw.length === 0)) return []
  return strings(raw, field).map((s) => {
    const c = parseCidr(s)
    if (typeof c === 'string') throw new ConfigError(field, c)
    return c
  })
}

/** The request facts rules look at. */
export interface RequestFacts {
  readonly ip: string
  readonly method: string
  /** The path without the query string. */
  readonly path: string
  readonly headers: IncomingHttpHeaders
}

/**
 * Bucket keys. A key is its rule's prefix (the name, then `~<generation>` once the rule's counters were reset: see
 * rulePrefix), then its `per` values: `name|v1|v2` while every value is short (RAW_MAX) and of a safe alphabet,
 * otherwise `name|#<hash>`: SHA-256 of the length-prefixed values, base64url (43 characters). A raw value never holds
 * `|` or `#`, so the two forms never meet and a raw key splits back into its values: a client-controlled value (an
 * 8 KB header, one holding `|`) can neither make a long key nor land in another client's bucket. Every key of a rule
 * is its prefix, or the prefix and `|` then more: what a reset or a lease table forgets by.
 */
const RAW_MAX = 64
/** Printable ASCII but `|` and `#` (the key's own marks), Redis's glob characters and Redis Cluster's hash-tag braces. */
const RAW_SAFE = (() => {
  const safe = new Uint8Array(128)
  for (let c = 0x21; c < 0x7f; c++) safe[c] = 1
  for (const c of '|#*?[]\\{}') safe[c.charCodeAt(0)] = 0
  return safe
})()

function isRaw(v: string): boolean {
  if (v.length > RAW_MAX) return false
  for (let i = 0; i < v.length; i++) {
    const c = v.charCodeAt(i)
    if (c > 0x7f || RAW_SAFE[c] === 0) return false
  }
  return true
}

/** A rule's generation in `g` (0 when absent). */
export function generationOf(g: Generations, rule: string): number {
  const n = Object.hasOwn(g, rule) ? g[rule] : undefined
  return typeof n === 'number' && Number.isSafeInteger(n) && n > 0 ? n : 0
}

/** The prefix of every bucket key of a rule: its name, then `~<generation>` once its counters were reset. */
export function rulePrefix(name: string, generation: number): string {
  return generation > 0 ? `${name}~${generation}` : name
}

/**
 * The key of one bucket: its rule's prefix and the `per` values (see "Bucket keys" above). The hot path and the
 * admin API's reset of one bucket both build keys here, so they meet.
 */
export function bucketKeyOf(prefix: string, values: readonly string[]): string {
  let raw = true
  for (let i = 0; i < values.length && raw; i++) raw = isRaw(values[i]!)
  let key = prefix
  if (raw) {
    for (let i = 0; i < values.length; i++) key += '|' + values[i]!
    return key
  }
  const h = createHash('sha256')
  // Each value as its length then its UTF-16 code units: an encoding of the list that no other list shares.
  for (const v of values) h.update(`${v.length}:`).update(v, 'utf16le')
  return key + '|#' + h.digest('base64url')
}

/** How a rule set builds its bucket keys. */
export interface KeyOptions {
  /** `per: ip` keys an IPv6 client by its network of this many bits (--limit-ipv6-prefix); default 64. */
  readonly ipv6Prefix?: number
  /** Each rule's generation (how often its counters were reset): part of its keys' prefix. */
  readonly generations?: Generations
}

/** IPv6 clients are grouped by their /64 unless the operator says otherwise. */
export const DEFAULT_IPV6_PREFIX = 64

/** One counter a request draws from (with its rule's limit and window: what a lease table takes). */
export interface Bucket {
  readonly rule: CompiledRule
  /** The counter's key: its rule's prefix plus the `per` values (bucketKeyOf). */
  readonly key: string
  readonly limit: number
  readonly windowMs: number
  readonly algorithm: Algorithm
  readonly burst: number
  /** The rule's shape (src/limiter/pool.ts shapeOf), made once per rule. */
  readonly shape: string
  /** Units this request uses of it. */
  readonly cost: number
}

/** A rule ready for the hot path. */
export class CompiledRule {
  readonly spec: RuleSpec
  readonly name: string
  readonly limit: number
  readonly windowMs: number
  /** `limit;w=seconds`, the draft's RateLimit-Policy item. */
  readonly policy: string
  /** The limit as text (RateLimit-Limit), made once. */
  readonly limitText: string
  /** Metric series keys and labels for its outcomes, made once (src/limiter/metrics.ts). */
  readonly allowedSeries: { readonly key: string; readonly labels: { rule: string; outcome: string } }
  readonly limitedSeries: { readonly key: string; readonly labels: { rule: string; outcome: string } }
  readonly algorithm: Algorithm
  readonly burst: number
  /** algorithm/limit/window/burst: a bucket's state made under another shape is carried over, not reused. */
  readonly shape: string
  readonly shadow: boolean
  readonly delay: boolean
  readonly maxDelayMs: number
  readonly whenRedisDown: RuleSpec['whenRedisDown']
  /** Every bucket key of the rule starts with this: the name, then `~<generation>` once it was reset. */
  readonly prefix: string
  readonly #ipv6Prefix: number
  /** The request's `per` values, refilled by each bucketKey call (synchronous: one array per rule, not per request). */
  readonly #values: string[]
  readonly #cost: RuleSpec['cost']
  readonly #ips: IpSet | null
  readonly #paths: RegExp[] | null
  readonly #methods: Set<string> | null
  readonly #headers: [string, RegExp][] | null

  constructor(spec: RuleSpec, generation = 0, ipv6Prefix = DEFAULT_IPV6_PREFIX) {
    this.spec = spec
    this.name = spec.name
    this.prefix = rulePrefix(spec.name, generation)
    this.#ipv6Prefix = ipv6Prefix
    this.#values = spec.per.map(() => '')
    this.limit = spec.limit
    this.windowMs = spec.windowMs
    this.policy = `${spec.limit};w=${spec.windowMs / 1000}`
    this.limitText = String(spec.limit)
    this.allowedSeries = { key: spec.name + ' a', labels: { rule: spec.name, outcome: 'allowed' } }
    // A rule stored before these fields existed (Redis, an older instance) reads as the defaults.
    this.algorithm = spec.algorithm ?? 'fixed'
    this.burst = spec.burst ?? spec.limit
    this.shape = shapeOf(this.algorithm, spec.limit, spec.windowMs, this.burst)
    this.shadow = spec.mode === 'shadow'
    this.delay = spec.onExceed === 'delay'
    this.maxDelayMs = spec.maxDelayMs ?? 0
    this.whenRedisDown = spec.whenRedisDown ?? 'local'
    this.#cost = spec.cost ?? 1
    const outcome = this.shadow ? ['shadow_allowed', 'shadow_limited'] : ['allowed', 'limited']
    this.allowedSeries = { key: spec.name + ' a', labels: { rule: spec.name, outcome: outcome[0]! } }
    this.limitedSeries = { key: spec.name + ' l', labels: { rule: spec.name, outcome: outcome[1]! } }
    this.#ips = spec.match.ip ? new IpSet(spec.match.ip.map((s) => parseCidr(s) as Cidr)) : null
    this.#paths = spec.match.path ? spec.match.path.map((p) => compilePathGlob(p) as RegExp) : null
    this.#methods = spec.match.method ? new Set(spec.match.method) : null
    this.#headers = spec.match.header
      ? Object.entries(spec.match.header).map(([h, g]) => [h, compileValueGlob(g)] as [string, RegExp])
      : null
  }

  /** True when the rule governs the request. */
  matches(r: RequestFacts): boolean {
    if (this.#methods !== null && !this.#methods.has(r.method)) return false
    if (this.#ips !== null && !this.#ips.has(r.ip)) return false
    if (this.#paths !== null) {
      let any = false
      for (const re of this.#paths) {
        if (re.test(r.path)) {
          any = true
          break
        }
      }
      if (!any) return false
    }
    if (this.#headers !== null) {
      for (const [name, re] of this.#headers) {
        const v = r.headers[name]
        if (v === undefined || !re.test(Array.isArray(v) ? v.join(', ') : v)) return false
      }
    }
    return true
  }

  /**
   * Units the request uses: the fixed cost, or the named header's whole number bounded to 1..max. A missing header
   * costs 1; one that is not a whole number costs max (a client cannot lower its cost by sending garbage).
   */
  cost(r: RequestFacts): number {
    const c = this.#cost
    if (typeof c === 'number') return c
    const v = r.headers[c.header]
    if (v === undefined) return 1
    const text = Array.isArray(v) ? v[0]! : v
    if (!/^\s*\d{1,9}\s*$/.test(text)) return c.max
    return Math.min(c.max, Math.max(1, Number(text)))
  }

  /** The bucket key for the request: the rule's prefix, then its `per` values (bucketKeyOf). */
  bucketKey(r: RequestFacts): string {
    const per = this.spec.per
    if (per.length === 0) return this.prefix
    const values = this.#values
    for (let i = 0; i < per.length; i++) {
      const p = per[i]!
      if (p === 'ip') values[i] = clientNetwork(r.ip, this.#ipv6Prefix)
      else if (p === 'path') values[i] = r.path
      else if (p === 'method') values[i] = r.method
      else {
        const h = r.headers[p.slice(7)]
        values[i] = h === undefined ? '' : Array.isArray(h) ? h.join(', ') : h
      }
    }
    return bucketKeyOf(this.prefix, values)
  }

  /**
   * The key of the bucket an operator names by its `per` values (the admin API's reset of one bucket): the same key
   * the requests it governs draw from. `per: ip` takes an address and groups it like a request's.
   */
  keyOf(values: readonly string[]): string {
    return bucketKeyOf(this.prefix, values.map((v, i) => (this.spec.per[i] === 'ip' ? clientNetwork(v, this.#ipv6Prefix) : v)))
  }
}

const NO_BUCKETS: readonly Bucket[] = Object.freeze([])

/** A compiled rule set plus the allow and deny lists. */
export class RuleSet {
  readonly rules: readonly CompiledRule[]
  /** The enforced rules, and the shadow ones (counted apart: they never reject, nor make another rule reject). */
  readonly #enforced: readonly CompiledRule[]
  readonly #shadow: readonly CompiledRule[]
  readonly version: number
  /** Each rule's generation, part of its bucket keys. */
  readonly generations: Generations
  readonly #allow: IpSet
  readonly #deny: IpSet
  readonly #sources: { readonly allow: readonly Cidr[]; readonly deny: readonly Cidr[]; readonly ipv6Prefix: number }

  constructor(specs: readonly RuleSpec[], allow: readonly Cidr[], deny: readonly Cidr[], version = 1, keys: KeyOptions = {}) {
    const generations = keys.generations ?? {}
    const ipv6Prefix = keys.ipv6Prefix ?? DEFAULT_IPV6_PREFIX
    this.rules = specs.map((s) => new CompiledRule(s, generationOf(generations, s.name), ipv6Prefix))
    this.generations = generations
    this.#sources = { allow, deny, ipv6Prefix }
    this.#enforced = this.rules.filter((r) => !r.shadow)
    this.#shadow = this.rules.filter((r) => r.shadow)
    this.#allow = new IpSet(allow)
    this.#deny = new IpSet(deny)
    this.version = version
  }

  /** The same rules with other generations (a reset): their buckets start afresh under new keys. */
  withGenerations(generations: Generations): RuleSet {
    const { allow, deny, ipv6Prefix } = this.#sources
    return new RuleSet(this.rules.map((r) => r.spec), allow, deny, this.version, { ipv6Prefix, generations })
  }

  /** True for a client on the deny list (403, no upstream call). */
  denies(ip: string): boolean {
    return this.#deny.has(ip)
  }

  /** The buckets the request draws from; empty when no rule governs it or the client is on the allow list. */
  bucketsFor(r: RequestFacts): readonly Bucket[] {
    return this.#buckets(this.#enforced, r)
  }

  /** The shadow rules' buckets for the request. */
  shadowBucketsFor(r: RequestFacts): readonly Bucket[] {
    return this.#buckets(this.#shadow, r)
  }

  #buckets(rules: readonly CompiledRule[], r: RequestFacts): readonly Bucket[] {
    // Most requests of a deployment without rules (or from an allowed client) allocate nothing here.
    if (rules.length === 0 || this.#allow.has(r.ip)) return NO_BUCKETS
    const out: Bucket[] = []
    for (const rule of rules) {
      if (!rule.matches(r)) continue
      out.push({ rule, key: rule.bucketKey(r), limit: rule.limit, windowMs: rule.windowMs, algorithm: rule.algorithm, burst: rule.burst, shape: rule.shape, cost: rule.cost(r) })
    }
    return out
  }
}
