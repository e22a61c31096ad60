import type { IncomingHttpHeaders } from 'node:http'

/**
 * What a shared cache may do with a request and a response, after RFC 9111 (HTTP Caching) and RFC 5861
 * (stale-while-revalidate, stale-if-error). Pure functions over headers; no I/O.
 */

/** Cache-Control directives: name -> argument (`true` for a directive without one). Names are lowercase. */
export type Directives = Map<string, string | true>

/** Parses Cache-Control (RFC 9111 5.2). A directive given twice keeps its first occurrence; `conflict` notes it. */
export function parseCacheControl(value: string | string[] | undefined): Directives {
  const out: Directives = new Map()
  if (value === undefined) return out
  const text = Array.isArray(value) ? value.join(',') : value
  for (const part of text.split(',')) {
    const eq = part.indexOf('=')
    const name = (eq === -1 ? part : part.slice(0, eq)).trim().toLowerCase()
    if (name === '') continue
    let arg: string | true = true
    if (eq !== -1) {
      arg = part.slice(eq + 1).trim()
      if (arg.startsWith('"') && arg.endsWith('"') && arg.length >= 2) arg = arg.slice(1, -1)
    }
    if (out.has(name)) {
      // RFC 9111 4.2.1: conflicting duplicates of a freshness directive make the response stale.
      if (out.get(name) !== arg) out.set('#conflict', true)
      continue
    }
    out.set(name, arg)
  }
  return out
}

/**
 * A delta-seconds argument (RFC 9111 1.2.2): a non-negative integer; values past 2^31 are 2^31.
 * Anything else is invalid: null (the caller treats the response as stale).
 */
export function deltaSeconds(arg: string | true | undefined): number | null {
  if (typeof arg !== 'string' || !/^\d+$/.test(arg)) return null
  return Math.min(Number(arg), 2 ** 31)
}

/** Status codes cacheable by default (RFC 9110 15.1). */
const HEURISTIC_STATUS = new Set([200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec']
const DAY = '(Mon|Tue|Wed|Thu|Fri|Sat|Sun)'
const LONG_DAY = '(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)'
const MONTH = '(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)'
const TIME = '(\\d{2}):(\\d{2}):(\\d{2})'
/** IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`. */
const IMF_FIXDATE = new RegExp(`^${DAY}, (\\d{2}) ${MONTH} (\\d{4}) ${TIME} GMT$`)
/** Obsolete RFC 850: `Sunday, 06-Nov-94 08:49:37 GMT`. */
const RFC850 = new RegExp(`^${LONG_DAY}, (\\d{2})-${MONTH}-(\\d{2}) ${TIME} GMT$`)
/** Obsolete asctime: `Sun Nov  6 08:49:37 1994`. */
const ASCTIME = new RegExp(`^${DAY} ${MONTH} ([ \\d]\\d) ${TIME} (\\d{4})$`)

function utc(year: number, month: string, day: number, h: string, m: string, s: string): number | null {
  const hh = Number(h)
  const mm = Number(m)
  const ss = Number(s)
  if (day < 1 || day > 31 || hh > 23 || mm > 59 || ss > 60) return null
  return Date.UTC(year, MONTHS.indexOf(month), day, hh, mm, Math.min(ss, 59))
}

/**
 * An HTTP-date as ms since the epoch, or null when invalid. Only the three forms of RFC 9110 5.6.7 are valid
 * (IMF-fixdate with "GMT", the obsolete RFC 850 and asctime forms); anything else (other zones such as UTC,
 * missing comma, extra spaces, dashes, a one-digit hour, several lines) is invalid, and an invalid Expires means
 * already stale (RFC 9111 5.3). `Date.parse` accepts all of those, so it is not used.
 */
export function parseHttpDate(value: string | undefined): number | null {
  if (value === undefined) return null
  let m = IMF_FIXDATE.exec(value)
  if (m !== null) return utc(Number(m[4]), m[3]!, Number(m[2]), m[5]!, m[6]!, m[7]!)
  m = RFC850.exec(value)
  if (m !== null) {
    // A two-digit year more than 50 years in the future means the past century (RFC 9110 5.6.7).
    let year = 2000 + Number(m[4])
    if (year > new Date().getUTCFullYear() + 50) year -= 100
    return utc(year, m[3]!, Number(m[2]), m[5]!, m[6]!, m[7]!)
  }
  m = ASCTIME.exec(value)
  if (m !== null) return utc(Number(m[7]), m[2]!, Number(m[3]!.trim()), m[4]!, m[5]!, m[6]!)
  return null
}

/** The facts about a response a cache decides on, computed once when it arrives. */
export interface ResponsePolicy {
  /** Why it may not be stored, or null when it may. */
  readonly notStorable: string | null
  /** Freshness lifetime in ms (0 = stale at once; must revalidate before use). */
  readonly freshnessMs: number
  /** stale-while-revalidate window in ms (0 when none, or when must-revalidate). */
  readonly swrMs: number
  /** stale-if-error window in ms (0 when none, or when must-revalidate). */
  readonly sieMs: number
  /** Vary header names, lowercase (empty when none). */
  readonly vary: readonly string[]
}

/** Operator settings that shape storage. */
export interface StoreRules {
  /** A TTL (ms) for a cacheable-by-default response that carries no freshness of its own, or null. */
  readonly defaultTtlMs: number | null
  /**
   * Targeted cache-control fields (RFC 9213), lowercase, most specific first (the operator's own, then
   * cdn-cache-control): the first one present replaces Cache-Control for this cache.
   */
  readonly targetedFields: readonly string[]
}

function first(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value
}

/**
 * Decides whether a response to a GET may be stored by a shared cache, and for how long it is fresh.
 * `requestHeaders` are the client's; `now` is when the response arrived.
 */
export function responsePolicy(
  status: number,
  headers: IncomingHttpHeaders,
  requestHeaders: IncomingHttpHeaders,
  rules: StoreRules,
  now: number,
): ResponsePolicy {
  let control: string | string[] | undefined = headers['cache-control']
  for (const field of rules.targetedFields) {
    const targeted = headers[field]
    if (targeted !== undefined) {
      control = targeted
      break
    }
  }
  const cc = parseCacheControl(control)
  const vary = varyNames(headers.vary)
  const none = (why: string): ResponsePolicy => ({ notStorable: why, freshnessMs: 0, swrMs: 0, sieMs: 0, vary })
  if (cc.has('no-store')) return none('no-store')
  if (cc.has('private')) return none('private')
  if (headers['set-cookie'] !== undefined) return none('set-cookie')
  if (vary.includes('*')) return none('vary: *')
  if (status === 206 || status < 200) return none(`status ${status}`)
  if (requestHeaders.authorization !== undefined && !cc.has('public') && !cc.has('s-maxage') && !cc.has('must-revalidate')) {
    return none('request had Authorization')
  }

  let freshnessMs: number | null = null
  let explicit = false
  if (cc.has('#conflict')) {
    freshnessMs = 0
    explicit = true
  } else if (cc.has('s-maxage')) {
    freshnessMs = (deltaSeconds(cc.get('s-maxage')) ?? 0) * 1000
    explicit = true
  } else if (cc.has('max-age')) {
    freshnessMs = (deltaSeconds(cc.get('max-age')) ?? 0) * 1000
    explicit = true
  } else if (headers.expires !== undefined) {
    const expires = parseHttpDate(first(headers.expires))
    const date = parseHttpDate(first(headers.date)) ?? now
    freshnessMs = expires === null ? 0 : Math.max(0, expires - date)
    explicit = true
  }
  if (!explicit) {
    if (!HEURISTIC_STATUS.has(status) || rules.defaultTtlMs === null) return none('no freshness information')
    freshnessMs = rules.defaultTtlMs
  }
  if (cc.has('no-cache')) freshnessMs = 0

  const mustRevalidate = cc.has('must-revalidate') || cc.has('proxy-revalidate') || cc.has('no-cache')
  const swrMs = mustRevalidate ? 0 : (deltaSeconds(cc.get('stale-while-revalidate')) ?? 0) * 1000
  const sieMs = mustRevalidate ? 0 : (deltaSeconds(cc.get('stale-if-error')) ?? 0) * 1000
  return { notStorable: null, freshnessMs: freshnessMs ?? 0, swrMs, sieMs, vary }
}

/** The Vary field names, lowercase. */
export function varyNames(value: string | string[] | undefined): string[] {
  if (value === undefined) return []
  const text = Array.isArray(value) ? value.join(',') : value
  return text
    .split(',')
    .map((v) => v.trim().toLowerCase())
    .filter((v) => v !== '')
}

/**
 * The corrected initial age of a response when it arrived (RFC 9111 4.2.3), in ms: the larger of its apparent age
 * (arrival minus Date) and its Age field plus the time the request took. An invalid Age is ignored (5.1).
 */
export function initialAgeMs(headers: IncomingHttpHeaders, requestTime: number, responseTime: number): number {
  const date = parseHttpDate(first(headers.date))
  const apparent = date === null ? 0 : Math.max(0, responseTime - date)
  const ageText = first(headers.age)?.split(',')[0]?.trim()
  const age = ageText !== undefined && /^\d+$/.test(ageText) ? Number(ageText) * 1000 : 0
  return Math.max(apparent, age + (responseTime - requestTime))
}

/** What the client's own Cache-Control asks of the cache (RFC 9111 5.2.1). */
export interface RequestDirectives {
  /** Neither serve from nor store into the cache. */
  readonly noStore: boolean
  /** Revalidate with the upstream before using a stored response (no-cache, Pragma: no-cache, max-age=0). */
  readonly noCache: boolean
  /** max-age=N: a stored response older than this is not used, ms (null: no bound). */
  readonly maxAgeMs: number | null
  /** min-fresh=N: a stored response must stay fresh at least this much longer, ms. */
  readonly minFreshMs: number
  /** only-if-cached: never go upstream; 504 when nothing usable is stored. */
  readonly onlyIfCached: boolean
}

/** Reads the request's Cache-Control (and the legacy Pragma: no-cache). max-stale is not honoured (a MAY). */
export function requestDirectives(headers: IncomingHttpHeaders): RequestDirectives {
  const cc = headers['cache-control']
  if (cc === undefined) return headers.pragma === 'no-cache' ? PRAGMA_NO_CACHE : NO_DIRECTIVES
  const d = parseCacheControl(cc)
  const maxAge = d.has('max-age') ? deltaSeconds(d.get('max-age')) : null
  return {
    noStore: d.has('no-store'),
    noCache: d.has('no-cache') || maxAge === 0,
    maxAgeMs: maxAge === null ? null : maxAge * 1000,
    minFreshMs: (deltaSeconds(d.get('min-fresh')) ?? 0) * 1000,
    onlyIfCached: d.has('only-if-cached'),
  }
}

const NO_DIRECTIVES: RequestDirectives = { noStore: false, noCache: false, maxAgeMs: null, minFreshMs: 0, onlyIfCached: false }
const PRAGMA_NO_CACHE: RequestDirectives = { ...NO_DIRECTIVES, noCache: true }

/** Whether a stored response of this age and freshness may answer a request with these directives without asking. */
export function usableFresh(d: RequestDirectives, ageMs: number, freshnessMs: number): boolean {
  if (d.noCache || ageMs >= freshnessMs) return false
  if (d.maxAgeMs !== null && ageMs > d.maxAgeMs) return false
  return freshnessMs - ageMs >= d.minFreshMs
}

/** Whether the client allows a stale response to be served while it is refreshed (no bound on age or freshness). */
export function allowsStale(d: RequestDirectives): boolean {
  return !d.noCache && d.maxAgeMs === null && d.minFreshMs === 0
}
