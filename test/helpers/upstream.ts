import { createHash } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'

/** What the test upstream saw of one request. */
export interface SeenRequest {
  method: string
  url: string
  rawHeaders: string[]
  headers: IncomingMessage['headers']
  bodyBytes: number
  bodySha256: string
}

/** A real HTTP server on 127.0.0.1:0 that stands for api.mercadolibre.com in tests. */
export interface TestUpstream {
  readonly url: string
  readonly port: number
  readonly seen: SeenRequest[]
  /** Requests received per path (without query). */
  hits(path: string): number
  /** Replace or add a route; the handler gets the request after its body has been read. */
  route(path: string, handler: (req: IncomingMessage, res: ServerResponse, body: Buffer) => void): void
  /** Client connections open to it now. */
  openConnections(): number
  close(): Promise<void>
}

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

/**
 * Starts the test upstream. Built-in routes:
 * - `/echo/...`: 200 with JSON {method, url, headers, rawHeaders, bodyBytes, bodySha256}; with ?raw=1 the body is echoed back as is
 * - `/slow?ms=N`: answers after N ms
 * - `/hang`: never answers
 * - `/redirect`: 302 to /echo/target
 * - `/hop`: a response carrying hop-by-hop headers and repeated ones
 * Anything else: 404.
 */
export async function startUpstream(): Promise<TestUpstream> {
  const seen: SeenRequest[] = []
  const routes = new Map<string, (req: IncomingMessage, res: ServerResponse, body: Buffer) => void>()
  const sockets = new Set<Socket>()

  routes.set('/echo', (req, res, body) => {
    const u = new URL(req.url!, 'http://x')
    if (u.searchParams.get('raw') === '1') {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'x-body-sha256': sha256(body) })
      res.end(body)
      return
    }
    const text = JSON.stringify({
      method: req.method,
      url: req.url,
      headers: req.headers,
      rawHeaders: req.rawHeaders,
      bodyBytes: body.length,
      bodySha256: sha256(body),
    })
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
    res.end(req.method === 'HEAD' ? undefined : text)
  })
  routes.set('/slow', (req, res) => {
    const ms = Number(new URL(req.url!, 'http://x').searchParams.get('ms') ?? 1000)
    setTimeout(() => res.end('slow done'), ms)
  })
  routes.set('/hang', () => {})
  routes.set('/redirect', (_req, res) => {
    res.writeHead(302, { location: '/echo/target' })
    res.end('moved')
  })
  routes.set('/hop', (_req, res) => {
    res.setHeader('connection', 'x-hop-named')
    res.setHeader('x-hop-named', 'must go')
    res.setHeader('keep-alive', 'timeout=1')
    res.setHeader('proxy-connection', 'keep-alive')
    res.setHeader('x-multi', ['one', 'two'])
    res.setHeader('set-cookie', ['a=1; Path=/', 'b=2; Path=/'])
    res.end('hop')
  })

  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const body = Buffer.concat(chunks)
      seen.push({
        method: req.method!,
        url: req.url!,
        rawHeaders: req.rawHeaders,
        headers: req.headers,
        bodyBytes: body.length,
        bodySha256: sha256(body),
      })
      const path = req.url!.split('?')[0]!
      const first = '/' + (path.split('/')[1] ?? '')
      const handler = routes.get(path) ?? routes.get(first)
      if (handler) handler(req, res, body)
      else {
        res.writeHead(404, { 'content-type': 'text/plain' })
        res.end('no such test route')
      }
    })
  })
  server.keepAliveTimeout = 10_000
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  const port = (server.address() as AddressInfo).port
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    seen,
    hits: (path) => seen.filter((s) => s.url.split('?')[0] === path).length,
    route: (path, handler) => routes.set(path, handler),
    openConnections: () => sockets.size,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      }),
  }
}
