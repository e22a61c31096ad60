import { ConfigError } from '../errors.js'
import { IpSet, parseCidr, type Cidr } from '../net/ip.js'
import { BadValue, duration, isHeaderName, MAX_DELAY, WINDOW } from '../values.js'
import { compilePathGlob, compileValueGlob } from './glob.js'
import type { Algorithm, PerKey, RuleSpec } from './types.js'

/**
 * Rate-limit rules as the operator writes them (config file, admin API): validated into plain RuleSpecs (JSON-safe:
 * they travel to workers and into Redis), and each `match` compiled once into Matchers (src/limiter/rules.ts runs
 * them). A rule governs the requests its `match` selects (every listed criterion must hold; absent = every request);
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
    // CIDRs and path globs are checked where they are written (the first bad field is the one named); the rule's
    // matchers are compiled from them once the whole `match` is read.
    if (raw.match.ip !== undefined) {
      match.ip = strings(raw.match.ip, `${field}.match.ip`)
      for (const ip of match.ip) cidrOf(ip, `${field}.match.ip`)
    }
    if (raw.match.path !== undefined) {
      match.path = strings(raw.match.path, `${field}.match.path`)
      for (const p of match.path) pathGlobOf(p, `${field}.match.path`)
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
  matchersOf(match, `${field}.match`) // kept for the rule's compilation
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
  return strings(raw, field).map((s) => cidrOf(s, field))
}

/** A rule's `match`, compiled: what the hot path tests (absent criterion: null). */
export interface Matchers {
  readonly ips: IpSet | null
  readonly paths: readonly RegExp[] | null
  readonly methods: ReadonlySet<string> | null
  readonly headers: readonly (readonly [string, RegExp])[] | null
}

/** The matchers built for each `match` object this process parsed or compiled: each is built once. */
const built = new WeakMap<RuleSpec['match'], Matchers>()

/**
 * The matchers of a rule's `match`: the ones built when it was parsed here, or built now (a spec that came over IPC
 * or from Redis); a ConfigError naming `field` for a CIDR or path glob that does not parse.
 */
export function matchersOf(match: RuleSpec['match'], field = 'match'): Matchers {
  let m = built.get(match)
  if (m === undefined) {
    m = {
      ips: match.ip ? new IpSet(match.ip.map((s) => cidrOf(s, `${field}.ip`))) : null,
      paths: match.path ? match.path.map((p) => pathGlobOf(p, `${field}.path`)) : null,
      methods: match.method ? new Set(match.method) : null,
      headers: match.header ? Object.entries(match.header).map(([h, g]) => [h, compileValueGlob(g)] as const) : null,
    }
    built.set(match, m)
  }
  return m
}

function cidrOf(text: string, field: string): Cidr {
  const c = parseCidr(text)
  if (typeof c === 'string') throw new ConfigError(field, c)
  return c
}

function pathGlobOf(glob: string, field: string): RegExp {
  const re = compilePathGlob(glob)
  if (typeof re === 'string') throw new ConfigError(field, re)
  return re
}
