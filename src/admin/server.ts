import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'

/**
 * The admin listener, served by the primary on --admin-host:--admin-port (never on the proxy port):
 * GET /healthz, GET /readyz, GET /metrics.
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
}

function json(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

async function route(req: IncomingMessage, res: ServerResponse, sources: AdminSources): Promise<void> {
  const path = (req.url ?? '/').split('?')[0]
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
