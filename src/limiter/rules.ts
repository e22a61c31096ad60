import { createHash } from 'node:crypto'
import type { IncomingHttpHeaders } from 'node:http'
import { clientNetwork, IpSet, type Cidr } from '../net/ip.js'
import { matchersOf } from './spec.js'
import { shapeOf } from './pool.js'
import type { Algorithm, Generations, RuleSpec } from './types.js'

/**
 * Rate-limit rules compiled for the hot path: which rules govern a request, its bucket keys and cost. The specs come
 * validated from src/limiter/spec.ts (the config file, the admin API), over IPC or from Redis.
 */

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
  readonly #paths: readonly RegExp[] | null
  readonly #methods: ReadonlySet<string> | null
  readonly #headers: readonly (readonly [string, RegExp])[] | null

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
    const m = matchersOf(spec.match)
    this.#ips = m.ips
    this.#paths = m.paths
    this.#methods = m.methods
    this.#headers = m.headers
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
