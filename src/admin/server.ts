import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { ConfigError, ErrorCodes, errorBody, MeliproxyError } from '../errors.js'
import { parseRuleSetDoc, type RuleVersion } from '../limiter/rule-store.js'
import { GROUPS, type Group, type StatsAnswer, type StatsQuery } from '../stats/query.js'
import { readAsset, type AssetName } from '../assets.js'
import { checkBearer } from './auth.js'
import { OPENAPI } from './openapi.js'

/**
 * The admin listener, served by the primary on --admin-host:--admin-port (never on the proxy port): health,
 * readiness, Prometheus metrics, the JSON API under /api (described at /api/openapi.json) and the dashboard at /.
 * Mutating calls need `Authorization: Bearer <--admin-token>`; when the listener binds a non-loopback address every
 * call but the dashboard's static files does.
 */

/** Why the instance is or is not ready. */
export interface Readiness {
  readonly ready: boolean
  readonly reasons: readonly string[]
  readonly workers: { readonly listening: number; readonly desired: number }
  readonly redis: 'not configured' | 'ok' | 'unreachable'
  /** The worst upstream circuit-breaker state over the workers. */
  readonly upstreamBreaker: 'closed' | 'half-open' | 'open'
  /** Routes whose circuit breaker is open or half-open in some worker. */
  readonly openRoutes: readonly string[]
}

/** What the admin listener asks of the primary. */
export interface AdminSources {
  readiness(): Promise<Readiness>
  metrics(): Promise<{ contentType: string; body: string }>
  /** Purges a path glob from both cache tiers everywhere; returns the L2 entries removed, or an error message. */
  purgeCache(glob: string): Promise<{ removed: number } | { invalid: string }>
  stats(q: StatsQuery): Promise<StatsAnswer>
  /** The rule set in force. */
  limits(): RuleVersion
  /** Stores and applies a validated rule set everywhere; returns the new version. */
  putLimits(doc: ReturnType<typeof parseRuleSetDoc>['doc'], source: RuleVersion['source']): Promise<RuleVersion>
  limitsHistory(): Promise<RuleVersion[]>
  /**
   * Resets the counters of a rule (its next generation), or of one bucket of it named by its `per` values; returns
   * the rule's generation and, for one bucket, how many counters were deleted.
   */
  resetLimit(rule: string, values: readonly string[] | null): Promise<{ generation: number; cleared?: number }>
  status(): Promise<Record<string, unknown>>
  /** The admin token, or null when none is configured. */
  readonly adminToken: string | null
  /** True when every call needs the token (the listener binds a non-loopback address). */
  readonly tokenForReads: boolean
}

/** A refusal of the admin API: a registered code (its status comes from src/errors.ts), and the field it is about. */
export class AdminError extends MeliproxyError {}

const MAX_BODY_BYTES = 1024 * 1024
const STATS_DEFAULT_RANGE_MS = 3_600_000
const STATS_MAX_LIMIT = 100

/** The dashboard's files (src/admin/dashboard/, embedded in the single executable: src/assets.ts). */
const ASSETS: Record<string, { file: AssetName; type: string }> = {
  '/': { file: 'dashboard/index.html', type: 'text/html; charset=utf-8' },
  '/dashboard.js': { file: 'dashboard/dashboard.js', type: 'text/javascript; charset=utf-8' },
  '/dashboard.css': { file: 'dashboard/dashboard.css', type: 'text/css; charset=utf-8' },
}

function json(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' })
  res.end(text)
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length
    if (size > MAX_BODY_BYTES) throw new AdminError('body_too_large', `the body is over ${MAX_BODY_BYTES} bytes`)
    chunks.push(chunk)
  }
  const text = Buffer.concat(chunks).toString('utf8')
  if (text.trim() === '') throw new AdminError('bad_request', 'send a JSON body')
  try {
    return JSON.parse(text)
  } catch (err) {
    throw new AdminError('invalid_json', `the body is not JSON: ${(err as Error).message}`)
  }
}

/** A time parameter: ISO 8601, epoch milliseconds, `now`, or `now-<n><s|m|h|d>`. */
export function parseTime(text: string, field: string, now: number): number {
  if (text === 'now') return now
  const rel = /^now-(\d+)(s|m|h|d)$/.exec(text)
  if (rel) return now - Number(rel[1]) * { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }[rel[2] as 's']
  if (/^\d{10,}$/.test(text)) return Number(text)
  const t = Date.parse(text)
  if (Number.isNaN(t)) throw new AdminError('bad_request', `${field}: "${text}" is not a time (ISO 8601, epoch ms, now, now-1h)`, field)
  return t
}

function statsQuery(params: URLSearchParams): StatsQuery {
  const now = Date.now()
  const to = params.has('to') ? parseTime(params.get('to')!, 'to', now) : now
  const from = params.has('from') ? parseTime(params.get('from')!, 'from', now) : to - STATS_DEFAULT_RANGE_MS
  if (from > to) throw new AdminError('bad_request', 'from: must not be after to', 'from')
  const group = (params.get('group') ?? 'route') as Group
  if (!GROUPS.includes(group)) throw new AdminError('bad_request', `group: "${group}" is not one of ${GROUPS.join(', ')}`, 'group')
  const limitText = params.get('limit') ?? '10'
  if (!/^\d+$/.test(limitText) || Number(limitText) < 1 || Number(limitText) > STATS_MAX_LIMIT) {
    throw new AdminError('bad_request', `limit: "${limitText}" is not a whole number from 1 to ${STATS_MAX_LIMIT}`, 'limit')
  }
  return { from, to, group, limit: Number(limitText) }
}

/**
 * The `per` values an operator's bucket key names: the key itself for a rule with one `per` (so a value holding `|`
 * can be named), else the key split at `|`, one value per entry of `per`.
 */
function perValues(per: unknown, key: string): string[] {
  const n = Array.isArray(per) ? per.length : 0
  if (n === 0) throw new AdminError('bad_request', 'key: the rule has no per (one bucket): reset the whole rule', 'key')
  const values = n === 1 ? [key] : key.split('|')
  if (values.length !== n) {
    throw new AdminError('bad_request', `key: give the rule's ${n} per values (${(per as string[]).join(', ')}) joined by |`, 'key')
  }
  return values
}

function requireToken(req: IncomingMessage, sources: AdminSources): void {
  const refused = checkBearer(req.headers, sources.adminToken)
  if (refused !== null) throw refused
}

type Handler = (req: IncomingMessage, url: URL, sources: AdminSources, res: ServerResponse) => Promise<[number, unknown] | null>

/** path -> method -> [mutating, handler]; a handler returning null wrote the response itself. */
const ROUTES: Record<string, Record<string, [boolean, Handler]>> = {
  '/healthz': { GET: [false, async () => [200, { status: 'ok' }]] },
  '/readyz': {
    GET: [false, async (_req, _url, s) => {
      const r = await s.readiness()
      return [r.ready ? 200 : 503, { status: r.ready ? 'ready' : 'not ready', ...r }]
    }],
  },
  '/api/openapi.json': { GET: [false, async () => [200, OPENAPI]] },
  '/api/status': { GET: [false, async (_req, _url, s) => [200, await s.status()]] },
  '/api/stats': { GET: [false, async (_req, url, s) => [200, await s.stats(statsQuery(url.searchParams))]] },
  '/api/limits': {
    GET: [false, async (_req, _url, s) => [200, s.limits()]],
    PUT: [true, async (req, _url, s) => {
      const body = await readJson(req)
      let parsed: ReturnType<typeof parseRuleSetDoc>
      try {
        parsed = parseRuleSetDoc(body)
      } catch (err) {
        if (err instanceof ConfigError) throw new AdminError('invalid_rules', err.message, err.field)
        throw err
      }
      return [200, await s.putLimits(parsed.doc, 'api')]
    }],
  },
  '/api/limits/history': { GET: [false, async (_req, _url, s) => [200, { versions: await s.limitsHistory() }]] },
  '/api/limits/rollback': {
    POST: [true, async (req, _url, s) => {
      const body = (await readJson(req)) as { version?: unknown }
      const v = body?.version
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
        throw new AdminError('bad_request', 'version: give the version number to roll back to', 'version')
      }
      const old = (await s.limitsHistory()).find((h) => h.version === v)
      if (old === undefined) throw new AdminError('not_found', `version: ${v} is not in the history`, 'version')
      return [200, await s.putLimits({ limits: old.limits, allow: old.allow, deny: old.deny }, 'rollback')]
    }],
  },
  '/api/limits/reset': {
    POST: [true, async (req, _url, s) => {
      const body = (await readJson(req)) as { rule?: unknown; key?: unknown }
      const rule = body?.rule
      if (typeof rule !== 'string' || rule === '') throw new AdminError('bad_request', 'rule: give the rule name', 'rule')
      const doc = s.limits().limits.find((r) => r.name === rule)
      if (doc === undefined) throw new AdminError('not_found', `rule: "${rule}" is not a rule in force`, 'rule')
      const key = body.key
      if (key !== undefined && (typeof key !== 'string' || key === '')) {
        throw new AdminError('bad_request', 'key: must be a bucket key (the rule\'s per values joined by |)', 'key')
      }
      const answer = await s.resetLimit(rule, key === undefined ? null : perValues(doc.per, key))
      return [200, { rule, key: key ?? null, ...answer }]
    }],
  },
  '/api/cache': {
    DELETE: [true, async (_req, url, s) => {
      const glob = url.searchParams.get('path')
      if (glob === null || glob === '') {
        throw new AdminError('bad_request', 'path: give the path or glob to purge: DELETE /api/cache?path=/items/**', 'path')
      }
      const r = await s.purgeCache(glob)
      if ('invalid' in r) throw new AdminError('bad_request', `path: ${r.invalid}`, 'path')
      return [200, { purged: glob, removedFromL2: r.removed }]
    }],
  },
  '/metrics': {
    GET: [false, async (_req, _url, s, res) => {
      const m = await s.metrics()
      res.writeHead(200, { 'content-type': m.contentType })
      res.end(m.body)
      return null
    }],
  },
}

async function route(req: IncomingMessage, res: ServerResponse, sources: AdminSources): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://admin')
  const path = url.pathname
  const method = req.method === 'HEAD' ? 'GET' : (req.method ?? 'GET')
  const asset = ASSETS[path]
  if (asset !== undefined && method === 'GET') {
    // The dashboard's files hold no data (the page asks the API, with the token where one is needed).
    const body = readAsset(asset.file)
    res.writeHead(200, { 'content-type': asset.type, 'content-length': body.length, 'cache-control': 'no-cache' })
    res.end(body)
    return
  }
  const methods = ROUTES[path]
  if (methods === undefined) throw new AdminError('not_found', `no admin endpoint ${path}`)
  const entry = methods[method]
  if (entry === undefined) {
    res.setHeader('allow', Object.keys(methods).join(', '))
    throw new AdminError('method_not_allowed', `${req.method} is not allowed on ${path} (allowed: ${Object.keys(methods).join(', ')})`)
  }
  const [mutating, handler] = entry
  if (mutating || sources.tokenForReads) requireToken(req, sources)
  const out = await handler(req, url, sources, res)
  if (out !== null) json(res, out[0], out[1])
}

/** Creates the admin HTTP server (not yet listening). */
export function createAdminServer(sources: AdminSources, onError: (err: Error) => void): Server {
  return createServer((req, res) => {
    route(req, res, sources).catch((err: Error) => {
      if (res.headersSent) return res.destroy()
      const known = err instanceof MeliproxyError && !(err instanceof ConfigError)
      if (!known) onError(err)
      const refusal = known ? err : new MeliproxyError(ErrorCodes.INTERNAL, 'admin request failed')
      const body = errorBody(refusal)
      res.writeHead(refusal.status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store' })
      res.end(body)
    })
  })
}
