import type { IncomingHttpHeaders } from 'node:http'
import type { Dispatcher } from 'undici'
import type { Exchange, UpstreamTap } from '../exchange.js'
import { compilePathGlob } from '../limiter/glob.js'
import { MeliproxyError } from '../errors.js'
import type { Pipeline } from '../pipeline/pipeline.js'
import { DecoratorHandler } from '../proxy/decorator.js'
import { send, sendError } from '../proxy/reply.js'
import { ageMs, variantId, type CacheEntry } from './entry.js'
import { CacheFill, type FetchRole } from './fill.js'
import type { CacheMetrics, CacheResult, CacheTier } from './metrics.js'
import { allowsStale, initialAgeMs, parseHttpDate, requestDirectives, responsePolicy, usableFresh, type RequestDirectives, type StoreRules } from './policy.js'
import { pathGlobMatcher, type Found, type Tiers } from './tiers.js'
import type { CacheRule, Purge } from './types.js'

/**
 * The shared HTTP cache in front of the upstream (RFC 9111, RFC 5861), for GET and HEAD; the cache stage of the
 * request path. Hits are answered here; misses, revalidations and bypasses are handed on to the upstream stage with a
 * fill (src/cache/fill.ts) that watches the answer:
 * fresh -> served (HIT); stale within stale-while-revalidate -> served (STALE) and refreshed once in the background;
 * stale with a validator -> revalidated with a conditional request (a 304 refreshes the stored headers);
 * otherwise fetched, streamed to the client and stored when cacheable. Concurrent misses for one URL make one upstream
 * request per worker, and one across workers and instances through a short Redis lease. An upstream error or timeout
 * is answered with stale content where stale-if-error allows. A successful request of any method not known to be
 * safe invalidates the URL (and same-origin Location/Content-Location) in every tier, worker and instance.
 */

/** Sends a request upstream with no client waiting (src/pipeline/upstream.ts): the background refresh. */
export interface Refresher {
  refresh(x: Exchange, handler: Dispatcher.DispatchHandler, validators: string[] | null): void
}

/** What the cache asks of the worker. */
export interface CacheIO {
  /** Where background refreshes go. */
  readonly upstream: Refresher
  /** Tells every worker of every instance to drop keys (or a path glob) from L1 and L2. */
  publishPurge(purge: Purge): void
}

/** Cache settings. */
export interface CacheOptions {
  readonly origin: string
  readonly maxObjectBytes: number
  readonly rules: readonly CacheRule[]
  /** Targeted cache-control fields (RFC 9213), lowercase, most specific first: the first present one is used. */
  readonly targetedFields: readonly string[]
  /** How long a miss lease lasts (and how long a waiter waits for the peer's fetch). */
  readonly leaseMs: number
}

/** Methods known to be safe (RFC 9110 9.2.1); any other, known or not (M-SEARCH), invalidates (RFC 9111 4.4). */
const SAFE = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE'])
const MISS_HEADERS: readonly string[] = ['x-cache', 'MISS']
/** Headers a 304 carries over to the client from the stored response (RFC 9110 15.4.5). */
const NOT_MODIFIED_HEADERS = new Set(['cache-control', 'content-location', 'date', 'etag', 'expires', 'vary', 'via'])
/** Headers of a 304 that must not replace the stored ones (RFC 9111 3.2). */
const KEEP_ON_REFRESH = new Set(['content-length', 'content-encoding', 'transfer-encoding', 'content-range'])

interface CompiledRule {
  readonly re: RegExp
  readonly rule: CacheRule
}

function headerValue(headers: readonly string[], name: string): string | null {
  for (let i = 0; i < headers.length; i += 2) if (headers[i] === name) return headers[i + 1]!
  return null
}

/** A flat header list without the field `name` (lowercase). */
function withoutField(headers: readonly string[], name: string): string[] {
  const out: string[] = []
  for (let i = 0; i < headers.length; i += 2) if (headers[i] !== name) out.push(headers[i]!, headers[i + 1]!)
  return out
}

function toIncoming(headers: readonly string[]): IncomingHttpHeaders {
  const out: Record<string, string | string[]> = {}
  for (let i = 0; i < headers.length; i += 2) {
    const k = headers[i]!
    const v = headers[i + 1]!
    const prev = out[k]
    out[k] = prev === undefined ? v : Array.isArray(prev) ? [...prev, v] : [prev, v]
  }
  return out
}

const served = new WeakMap<CacheEntry, string[]>()

/** The entry's headers plus `age` and `x-cache` slots, made once per entry. */
function servedHeaders(e: CacheEntry): string[] {
  let h = served.get(e)
  if (h === undefined) {
    h = e.headers.concat('age', '0', 'x-cache', 'HIT')
    served.set(e, h)
  }
  return h
}

/** Weak comparison of entity tags (RFC 9110 8.8.3.2) against an If-None-Match list. */
function etagMatches(ifNoneMatch: string, etag: string): boolean {
  if (ifNoneMatch.trim() === '*') return true
  const bare = etag.replace(/^W\//, '')
  return ifNoneMatch.split(',').some((t) => t.trim().replace(/^W\//, '') === bare)
}

/** The HTTP cache of one worker. */
export class HttpCache {
  readonly #tiers: Tiers
  readonly #io: CacheIO
  readonly #options: CacheOptions
  readonly #metrics: CacheMetrics
  readonly #rules: CompiledRule[]
  /** Misses this worker leads, by key: what the others wait on. */
  readonly #inflight = new Map<string, Lead>()
  readonly #refreshing = new Set<string>()

  constructor(tiers: Tiers, io: CacheIO, options: CacheOptions, metrics: CacheMetrics) {
    this.#tiers = tiers
    this.#io = io
    this.#options = options
    this.#metrics = metrics
    this.#rules = options.rules.map((rule) => ({ re: compilePathGlob(rule.path) as RegExp, rule }))
  }

  /** The cache key of a request target. */
  key(url: string): string {
    return this.#options.origin + url
  }

  /** Answers the exchange from the cache, or hands it on to the upstream stage (`p.next`) with a fill to watch. */
  handle(x: Exchange, p: Pipeline): void {
    if (x.method !== 'GET' && x.method !== 'HEAD') return this.#passThrough(x, p)
    const rule = this.#ruleFor(x.path)
    const directives = requestDirectives(x.headers)
    if (rule?.bypass || directives.noStore || x.headers.range !== undefined) return this.#bypass(x, p)
    const key = this.key(x.url)
    const found = this.#tiers.lookup(key, x.headers)
    if (found === null || !('then' in found)) return this.#decide(x, p, key, found, directives)
    found.then((f) => this.#decide(x, p, key, f, directives))
  }

  /** Drops keys or a glob from this worker's L1 (a purge message from any worker or instance). */
  dropLocal(purge: Purge): number {
    if (purge.keys !== undefined) {
      const keys = new Set(purge.keys)
      return this.#tiers.dropLocal((k) => keys.has(k))
    }
    if (purge.glob !== undefined) return this.#tiers.dropLocal(this.globMatcher(purge.glob))
    return 0
  }

  /** A key matcher for a path glob (matched against the key's path, without origin and query). */
  globMatcher(glob: string): (key: string) => boolean {
    const match = pathGlobMatcher(this.#options.origin, glob)
    if (typeof match === 'string') throw new Error(match)
    return match
  }

  /** Removes keys or a path glob from L2, and from L1 in every worker of every instance. */
  async purge(purge: Purge): Promise<number> {
    this.#io.publishPurge(purge)
    const n = this.dropLocal(purge)
    const shared = await this.#tiers.dropShared(
      purge.keys ?? null,
      purge.glob !== undefined ? this.globMatcher(purge.glob) : () => false,
    )
    return Math.max(n, shared)
  }

  #ruleFor(path: string): CacheRule | null {
    for (const r of this.#rules) if (r.re.test(path)) return r.rule
    return null
  }

  /** Methods the cache does not serve: forwarded; a successful unsafe one invalidates what is stored. */
  #passThrough(x: Exchange, p: Pipeline): void {
    if (SAFE.has(x.method)) return this.#bypass(x, p)
    x.cache = 'BYPASS'
    x.tap = new Invalidation(this, x.url)
    // The URL is dropped everywhere before the request goes upstream (dropping is always safe), so a client that
    // reads right after its own write never gets the old version from another worker or from L2.
    void this.purge({ keys: [this.key(x.url)] }).then(() => p.next(x))
  }

  /** The keys a successful unsafe request invalidates: its URL, and same-origin Location / Content-Location. */
  invalidated(url: string, headers: IncomingHttpHeaders): string[] {
    const keys = [this.key(url)]
    for (const name of ['location', 'content-location'] as const) {
      const v = headers[name]
      if (typeof v !== 'string') continue
      try {
        const target = new URL(v, this.#options.origin + url)
        if (target.origin === this.#options.origin) keys.push(this.key(target.pathname + target.search))
      } catch {
        // not a URL: nothing to invalidate
      }
    }
    return keys
  }

  #bypass(x: Exchange, p: Pipeline): void {
    x.cache = 'BYPASS'
    this.#metrics.request('bypass', 'none')
    p.next(x)
  }

  #decide(x: Exchange, p: Pipeline, key: string, found: Found | null, d: RequestDirectives): void {
    if (x.res.destroyed) return // the client left (recorded when it left)
    if (found !== null) {
      const e = found.entry
      if (usableFresh(d, ageMs(e, x.time), e.freshnessMs)) return this.#serve(x, e, 'HIT', 'hit', found.tier)
      // A stale L1 copy: another worker or instance may have refreshed it in L2 already (one revalidation for the
      // fleet, not one per worker).
      if (found.tier === 'l1' && this.#tiers.l2Ready) {
        void this.#tiers.lookupL2(key, x.headers).then((inL2) => {
          if (x.res.destroyed) return
          const fresher = inL2 !== null && inL2.entry.responseTime > e.responseTime ? inL2 : found
          this.#decideStale(x, p, key, fresher, d)
        })
        return
      }
      return this.#decideStale(x, p, key, found, d)
    }
    if (d.onlyIfCached) return this.#notCached(x)
    if (x.method === 'HEAD') return this.#fetch(x, p, key, null, 'own')
    const waiting = this.#inflight.get(key)
    if (waiting !== undefined) {
      this.#metrics.collapsed.inc()
      waiting.entry.then((entry) => this.#afterWait(x, p, key, entry))
      return
    }
    // This worker leads the miss; across workers and instances the first to take the Redis lease fetches, and the
    // others wait for its answer to land in L2.
    const lead = new Lead()
    this.#inflight.set(key, lead)
    const lease = this.#tiers.l2Ready ? this.#tiers.lease(key, this.#options.leaseMs) : Promise.resolve(true)
    lease
      .then((taken) => (taken ? null : this.#waitForPeer(key, x.headers)))
      .then((peer) => {
        if (peer === null) return this.#fetch(x, p, key, null, 'lead')
        this.#inflight.delete(key)
        lead.settle(peer)
        this.#metrics.collapsed.inc()
        this.#serve(x, peer, 'HIT', 'hit', 'l2')
      })
  }

  /** A stored entry that is not fresh (or a client asked to revalidate): serve stale and refresh, or fetch. */
  #decideStale(x: Exchange, p: Pipeline, key: string, found: Found, d: RequestDirectives): void {
    const e = found.entry
    const age = ageMs(e, x.time)
    if (usableFresh(d, age, e.freshnessMs)) return this.#serve(x, e, 'HIT', 'hit', found.tier)
    if (allowsStale(d) && age < e.freshnessMs + e.swrMs) {
      this.#serve(x, e, 'STALE', 'stale', found.tier)
      return this.#refreshInBackground(x, key, e)
    }
    if (d.onlyIfCached) return this.#notCached(x)
    this.#fetch(x, p, key, e, 'own')
  }

  /** only-if-cached and nothing usable is stored: 504, the upstream is not asked (RFC 9111 5.2.1.7). */
  #notCached(x: Exchange): void {
    x.cache = 'MISS'
    this.#metrics.request('miss', 'none')
    sendError(x, new MeliproxyError('not_cached', 'only-if-cached: no usable stored response'), MISS_HEADERS)
  }

  #afterWait(x: Exchange, p: Pipeline, key: string, entry: CacheEntry | null): void {
    if (entry !== null && entry.variant === variantId(entry.vary, x.headers)) return this.#serve(x, entry, 'HIT', 'hit', 'upstream')
    this.#fetch(x, p, key, null, 'own')
  }

  /** Polls L2 for the entry a peer is fetching, until the lease would have expired. */
  async #waitForPeer(key: string, headers: IncomingHttpHeaders): Promise<CacheEntry | null> {
    const deadline = Date.now() + this.#options.leaseMs
    while (Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20))
      const found = await this.#tiers.lookupL2(key, headers)
      if (found !== null) return found.entry
    }
    return null
  }

  /**
   * Hands the exchange on to the upstream: conditionally when `stale` has a validator, with a fill that stores a
   * cacheable answer and falls back to `stale` on an upstream error where stale-if-error allows (src/cache/fill.ts).
   */
  #fetch(x: Exchange, p: Pipeline, key: string, stale: CacheEntry | null, role: FetchRole): void {
    const validators = stale !== null && x.method === 'GET' ? this.#validators(stale) : null
    x.cache = 'MISS'
    x.tap = new CacheFill(this, x, key, stale, validators, role)
    p.next(x)
  }

  /** stale-while-revalidate: one background refresh per key per worker (and one across instances, by lease). */
  #refreshInBackground(x: Exchange, key: string, stale: CacheEntry): void {
    if (this.#refreshing.has(key)) return
    this.#refreshing.add(key)
    void this.#tiers.lease(key, this.#options.leaseMs).then((taken) => {
      if (!taken) {
        this.#refreshing.delete(key)
        return
      }
      const validators = this.#validators(stale)
      this.#io.upstream.refresh(x, new CacheFill(this, x, key, stale, validators, 'refresh'), validators)
    })
  }

  /** A fetch of `key` is over (src/cache/fill.ts): the waiters of a miss it led get `stored`, and the lease goes. */
  fetched(key: string, role: FetchRole, stored: CacheEntry | null): void {
    if (role === 'own') return
    if (role === 'refresh') this.#refreshing.delete(key)
    else {
      const lead = this.#inflight.get(key)
      this.#inflight.delete(key)
      lead?.settle(stored)
    }
    this.#tiers.release(key)
  }

  /** A fetched answer went on to the client. */
  relayed(): void {
    this.#metrics.request('miss', 'upstream')
  }

  /** Answers the client of a fetch from an entry instead of the upstream's answer: refreshed by a 304, or stale. */
  answerFetched(x: Exchange, e: CacheEntry, revalidated: boolean): void {
    if (revalidated) this.#serve(x, e, 'HIT', 'revalidated', 'upstream')
    else this.#serve(x, e, 'STALE', 'stale', 'upstream')
  }

  #validators(e: CacheEntry): string[] | null {
    if (e.etag !== null) return ['if-none-match', e.etag]
    if (e.lastModified !== null) return ['if-modified-since', e.lastModified]
    return null
  }

  /** Answers from a stored entry: 304 when the client's validators match, else the stored response. */
  #serve(x: Exchange, e: CacheEntry, label: string, result: CacheResult, tier: CacheTier): void {
    x.cache = label
    this.#metrics.request(result, tier)
    if (x.res.destroyed) return // the client left (recorded when it left)
    const age = String(Math.floor(ageMs(e, x.time) / 1000))
    if (this.#notModified(x.headers, e)) {
      const headers: string[] = []
      for (let i = 0; i < e.headers.length; i += 2) {
        if (NOT_MODIFIED_HEADERS.has(e.headers[i]!)) headers.push(e.headers[i]!, e.headers[i + 1]!)
      }
      headers.push('age', age, 'x-cache', label)
      if (x.rateHeaders !== null) headers.push(...x.rateHeaders)
      return send(x, 304, undefined, headers, undefined)
    }
    let headers: string[]
    if (x.rateHeaders === null) {
      // writeHead() copies the fields at once, so one array per entry serves every hit: only the values change.
      headers = servedHeaders(e)
      headers[headers.length - 3] = age
      headers[headers.length - 1] = label
    } else {
      headers = e.headers.concat('age', age, 'x-cache', label, x.rateHeaders)
    }
    send(x, e.status, e.statusMessage, headers, x.method === 'HEAD' ? undefined : e.body)
  }

  #notModified(h: IncomingHttpHeaders, e: CacheEntry): boolean {
    if (e.status !== 200) return false
    const inm = h['if-none-match']
    if (inm !== undefined) return e.etag !== null && etagMatches(inm, e.etag)
    const ims = h['if-modified-since']
    if (ims !== undefined && e.lastModified !== null) {
      // Only a valid HTTP-date counts; an invalid If-Modified-Since is ignored (RFC 9110 13.1.3).
      const since = parseHttpDate(ims)
      const modified = parseHttpDate(e.lastModified)
      return since !== null && modified !== null && modified <= since
    }
    return false
  }

  /** True when a response with these headers may be stored (checked before its body is collected). */
  storable(x: Exchange, status: number, headers: IncomingHttpHeaders): boolean {
    const rule = this.#ruleFor(x.path)
    const rules: StoreRules = { defaultTtlMs: rule?.ttlMs ?? null, targetedFields: this.#options.targetedFields }
    return responsePolicy(status, headers, x.headers, rules, Date.now()).notStorable === null
  }

  /** Builds an entry from a response that arrived at `responseTime`; null when it may not be stored. */
  entryFrom(
    x: Exchange,
    status: number,
    statusMessage: string,
    clientHeaders: readonly string[],
    body: Buffer,
    requestTime: number,
    responseTime: number,
  ): CacheEntry | null {
    const incoming = toIncoming(clientHeaders)
    // The cache sends its own Age (RFC 9111 4.2.3, 5.1): the upstream's is in initialAgeMs, never stored to be
    // sent a second time.
    const stored = clientHeaders.includes('age') ? withoutField(clientHeaders, 'age') : clientHeaders
    const rule = this.#ruleFor(x.path)
    const rules: StoreRules = { defaultTtlMs: rule?.ttlMs ?? null, targetedFields: this.#options.targetedFields }
    const p = responsePolicy(status, incoming, x.headers, rules, responseTime)
    if (p.notStorable !== null) return null
    return {
      status,
      statusMessage,
      headers: stored,
      body,
      responseTime,
      initialAgeMs: initialAgeMs(incoming, requestTime, responseTime),
      freshnessMs: p.freshnessMs,
      swrMs: p.swrMs,
      sieMs: p.sieMs,
      vary: p.vary,
      variant: variantId(p.vary, x.headers),
      etag: headerValue(stored, 'etag'),
      lastModified: headerValue(stored, 'last-modified'),
    }
  }

  /** The stored entry updated by a 304's headers (RFC 9111 4.3.4). */
  refreshed(x: Exchange, stale: CacheEntry, notModifiedHeaders: readonly string[], requestTime: number, responseTime: number): CacheEntry | null {
    const replaced = new Set<string>()
    for (let i = 0; i < notModifiedHeaders.length; i += 2) {
      if (!KEEP_ON_REFRESH.has(notModifiedHeaders[i]!)) replaced.add(notModifiedHeaders[i]!)
    }
    const merged: string[] = []
    for (let i = 0; i < stale.headers.length; i += 2) {
      if (!replaced.has(stale.headers[i]!)) merged.push(stale.headers[i]!, stale.headers[i + 1]!)
    }
    for (let i = 0; i < notModifiedHeaders.length; i += 2) {
      if (replaced.has(notModifiedHeaders[i]!)) merged.push(notModifiedHeaders[i]!, notModifiedHeaders[i + 1]!)
    }
    return this.entryFrom(x, stale.status, stale.statusMessage, merged, stale.body, requestTime, responseTime)
  }

  /** Stores an entry in both tiers. */
  store(key: string, entry: CacheEntry): void {
    this.#tiers.store(key, entry)
  }

  /** The largest body stored. */
  get maxObjectBytes(): number {
    return this.#options.maxObjectBytes
  }
}

/** A miss this worker leads: the others wait on `entry`, settled once with what the fetch stored (or null). */
class Lead {
  settle!: (e: CacheEntry | null) => void
  readonly entry = new Promise<CacheEntry | null>((resolve) => (this.settle = resolve))
}

/**
 * Watches the answer to an unsafe request (a POST, a DELETE) for the cache: on success it invalidates the URL again
 * (RFC 9111 4.4), with Location / Content-Location, and anything a concurrent GET stored while it was upstream.
 */
class Invalidation extends DecoratorHandler implements UpstreamTap {
  readonly validators = null
  readonly #cache: HttpCache
  readonly #url: string

  constructor(cache: HttpCache, url: string) {
    super(NONE)
    this.#cache = cache
    this.#url = url
  }

  wrap(client: Dispatcher.DispatchHandler): Dispatcher.DispatchHandler {
    this.inner = client
    return this
  }

  override onResponseStart(controller: Dispatcher.DispatchController, status: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    if (status >= 200 && status < 400) void this.#cache.purge({ keys: this.#cache.invalidated(this.#url, headers) })
    this.inner.onResponseStart?.(controller, status, headers, statusMessage)
  }
}

const NONE: Dispatcher.DispatchHandler = {}
