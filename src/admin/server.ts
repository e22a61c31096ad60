import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { checkBearer } from './auth.js'

/**
 * The admin listener, served by the primary on --admin-host:--admin-port (never on the proxy port):
 * GET /healthz, GET /readyz, GET /metrics, and DELETE /api/cache?path=<path or glob> (bearer token).
 */

/** Why the instance is or is not ready. */
export interface Readiness {
  readonly ready: boolean
  readonly reasons: readonly string[]
  readonly workers: { readonly listening: number; readonly desired: number }
  readonly redis: 'not configured' | 'ok' | 'unreachable'
}

/** What the admin listener asks of the primary. */
export interface AdminSources {
  readiness(): Promise<Readiness>
  metrics(): Promise<{ contentType: string; body: string }>
  /** Purges a path glob from both cache tiers everywhere; returns the L2 entries removed, or an error message. */
  purgeCache(glob: string): Promise<{ removed: number } | { invalid: string }>
  /** The admin token, or null when none is configured. */
  readonly adminToken: string | null
}

function json(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

async function route(req: IncomingMessage, res: ServerResponse, sources: AdminSources): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://admin')
  const path = url.pathname
  if (path === '/api/cache') {
    if (req.method !== 'DELETE') {
      json(res, 405, { error: 'method_not_allowed', message: `${req.method} is not allowed on ${path}` })
      return
    }
    const refused = checkBearer(req.headers, sources.adminToken)
    if (refused !== null) {
      json(res, refused.status, { error: refused.error, message: refused.message })
      return
    }
    const glob = url.searchParams.get('path')
    if (glob === null || glob === '') {
      json(res, 400, { error: 'bad_request', message: 'give the path or glob to purge: DELETE /api/cache?path=/items/**' })
      return
    }
    const r = await sources.purgeCache(glob)
    if ('invalid' in r) json(res, 400, { error: 'bad_request', message: `path: ${r.invalid}` })
    else json(res, 200, { purged: glob, removedFromL2: r.removed })
    return
  }
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    json(res, 405, { error: 'method_not_allowed', message: `${req.method} is not allowed on ${path}` })
    return
  }
  switch (path) {
    case '/healthz':
      json(res, 200, { status: 'ok' })
      return
    case '/readyz': {
      const r = await sources.readiness()
      json(res, r.ready ? 200 : 503, { status: r.ready ? 'ready' : 'not ready', ...r })
      return
    }
    case '/metrics': {
      const m = await sources.metrics()
      res.writeHead(200, { 'content-type': m.contentType })
      res.end(m.body)
      return
    }
    default:
      json(res, 404, { error: 'not_found', message: `no admin endpoint ${path}` })
  }
}

/** Creates the admin HTTP server (not yet listening). */
export function createAdminServer(sources: AdminSources, onError: (err: Error) => void): Server {
  return createServer((req, res) => {
    route(req, res, sources).catch((err: Error) => {
      onError(err)
      if (!res.headersSent) json(res, 500, { error: 'internal', message: 'admin request failed' })
      else res.destroy()
    })
  })
}
