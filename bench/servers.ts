import cluster from 'node:cluster'
import { createServer } from 'node:http'
import { Pool } from 'undici'

/**
 * The bench's own servers, each a separate process:
 *   upstream PORT           a mock api.mercadolibre.com answering a realistic 2.5 KB category body
 *   bare PORT WORKERS       baseline: a Node cluster answering the same body from memory
 *   undici-proxy PORT WORKERS UPSTREAM
 *                           baseline: a bare undici proxy (pool.stream, no header rewriting, no metrics, no logs)
 */

/** A body shaped like GET /categories/MLA97994 (about 2.5 KB of JSON). */
export function categoryBody(): Buffer {
  const children = Array.from({ length: 24 }, (_, i) => ({ id: `MLA${1000 + i}`, name: `Subcategoria ${i}` }))
  const doc = {
    id: 'MLA97994',
    name: 'Celulares y Smartphones',
    picture: 'http://resources.mlstatic.com/category/images/MLA97994.png',
    permalink: 'http://home.mercadolibre.com.ar/celulares-smartphones/',
    total_items_in_this_category: 184_543,
    path_from_root: [
      { id: 'MLA1051', name: 'Celulares y Teléfonos' },
      { id: 'MLA97994', name: 'Celulares y Smartphones' },
    ],
    children_categories: children,
    settings: { adult_content: false, buying_allowed: true, currencies: ['ARS'], max_pictures_per_item: 12 },
  }
  let text = JSON.stringify(doc)
  while (Buffer.byteLength(text) < 2_500) text = text.replace('}', ', "pad": "' + 'x'.repeat(40) + '"}')
  return Buffer.from(text)
}

/** Headers shaped like the real upstream's. */
export function upstreamHeaders(body: Buffer): Record<string, string> {
  return {
    'content-type': 'application/json;charset=UTF-8',
    'content-length': String(body.length),
    'cache-control': 'max-age=600,stale-while-revalidate=300, stale-if-error=1200',
    vary: 'Accept-Encoding, User-Agent',
    etag: '"5f1e3a9c"',
    'x-content-type-options': 'nosniff',
    'x-request-id': '8a7f6b2c-4d1e-4f3a-9b2c-1d2e3f4a5b6c',
    'access-control-allow-origin': '*',
  }
}

function serveFromMemory(port: number): void {
  const body = categoryBody()
  const headers = upstreamHeaders(body)
  createServer((req, res) => {
    req.resume()
    res.writeHead(200, headers)
    res.end(body)
  }).listen(port, '127.0.0.1')
}

function undiciProxy(port: number, upstream: string): void {
  const pool = new Pool(upstream)
  createServer((req, res) => {
    pool
      .stream({ path: req.url!, method: 'GET', headers: req.headers as Record<string, string>, opaque: res }, ({ statusCode, headers, opaque }) => {
        const out = opaque as typeof res
        delete headers.connection
        delete headers['keep-alive']
        out.writeHead(statusCode, headers as Record<string, string>)
        return out
      })
      .catch(() => {
        if (!res.headersSent) res.writeHead(502)
        res.end()
      })
  }).listen(port, '127.0.0.1')
}

function clustered(workers: number, start: () => void): void {
  if (cluster.isPrimary) {
    for (let i = 0; i < workers; i++) cluster.fork()
    process.on('SIGTERM', () => {
      for (const w of Object.values(cluster.workers ?? {})) w?.process.kill('SIGTERM')
      process.exit(0)
    })
  } else {
    start()
  }
}

const [kind, portText, workersText, upstream] = process.argv.slice(2)
const port = Number(portText)
if (kind === 'upstream') serveFromMemory(port)
else if (kind === 'bare') clustered(Number(workersText), () => serveFromMemory(port))
else if (kind === 'undici-proxy') clustered(Number(workersText), () => undiciProxy(port, upstream!))
else if (kind !== undefined) {
  process.stderr.write(`unknown server kind ${kind}\n`)
  process.exit(2)
}
