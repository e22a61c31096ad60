import { request } from 'undici'
import t from 'tap'
import { loadConfig } from '../../src/config.js'
import { Worker } from '../../src/worker.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * A worker in this process (no fork, no Redis: L1 only) against an upstream in this process: the whole request
 * path, guard -> limit -> cache -> forward, started and closed by the test. The cache's behaviours that need two
 * workers or instances (L2, collapsing across processes, purge fan-out) are in test/integration.
 */

let upstream: TestUpstream
let worker: Worker
let base: string
let etagAsked = 0

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/fresh', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60', age: '30', 'content-type': 'text/plain' })
    res.end('fresh body')
  })
  upstream.route('/etag', (req, res) => {
    etagAsked++
    if (req.headers['if-none-match'] === '"v1"') {
      res.writeHead(304, { etag: '"v1"', 'cache-control': 'max-age=0' })
      return res.end()
    }
    res.writeHead(200, { etag: '"v1"', 'cache-control': 'max-age=0' })
    res.end('versioned')
  })
  upstream.route('/item', (req, res) => {
    res.writeHead(req.method === 'POST' ? 201 : 200, { 'cache-control': 'max-age=60' })
    res.end(`${req.method} ${Date.now()}`)
  })
  upstream.route('/private', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60', 'set-cookie': 'session=1' })
    res.end('mine')
  })
  const config = loadConfig({
    flags: { upstream: upstream.url, host: '127.0.0.1', workers: '1', logLevel: 'error', accessLog: false },
    env: {},
  })
  worker = new Worker({ ...config, port: 0 }) // the CLI refuses port 0; a test wants any free one
  await worker.start()
  base = `http://127.0.0.1:${worker.port()}`
})

t.teardown(async () => {
  worker.close('test over')
  await worker.closed
  await upstream.close()
})

async function get(path: string, method = 'GET', headers: Record<string, string> = {}): Promise<{ status: number; headers: Record<string, unknown>; body: string }> {
  const r = await request(base + path, { method, headers })
  return { status: r.statusCode, headers: r.headers, body: await r.body.text() }
}

t.test('a fresh response is served from L1 with one Age, the upstream asked once', async (t) => {
  const first = await get('/fresh/1')
  const second = await get('/fresh/1')
  t.equal(first.headers['x-cache'], 'MISS')
  t.equal(second.headers['x-cache'], 'HIT')
  t.equal(second.body, 'fresh body')
  t.equal(typeof second.headers.age, 'string', 'one Age field, not a list')
  t.ok(Number(second.headers.age) >= 30, "the upstream's Age counts")
  t.equal(upstream.hits('/fresh/1'), 1)
})

t.test('a stale response with a validator is revalidated: the 304 is answered with the stored body', async (t) => {
  etagAsked = 0
  t.equal((await get('/etag/a')).body, 'versioned')
  const again = await get('/etag/a')
  t.equal(again.status, 200)
  t.equal(again.body, 'versioned')
  t.equal(again.headers['x-cache'], 'HIT', 'refreshed by the 304')
  t.equal(etagAsked, 2, 'one fetch, one conditional request')
})

t.test('a successful unsafe method invalidates the URL', async (t) => {
  const before = await get('/item/7')
  t.equal((await get('/item/7')).body, before.body, 'cached')
  t.equal((await get('/item/7', 'POST')).status, 201)
  const after = await get('/item/7')
  t.equal(after.headers['x-cache'], 'MISS', 'fetched again after the POST')
  t.not(after.body, before.body)
})

t.test('a response with Set-Cookie is never stored', async (t) => {
  await get('/private/x')
  const second = await get('/private/x')
  t.not(second.headers['x-cache'], 'HIT')
  t.equal(upstream.hits('/private/x'), 2)
})

t.test('concurrent misses for one URL make one upstream request', async (t) => {
  upstream.route('/collapse', (_req, res) => {
    setTimeout(() => {
      res.writeHead(200, { 'cache-control': 'max-age=60' })
      res.end('once')
    }, 100)
  })
  const answers = await Promise.all(Array.from({ length: 10 }, () => get('/collapse/1')))
  t.same(new Set(answers.map((a) => a.body)), new Set(['once']))
  t.equal(upstream.hits('/collapse/1'), 1)
})

t.test("the client's max-age, min-fresh and only-if-cached (RFC 9111 5.2.1)", async (t) => {
  upstream.route('/aged', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=600', age: '100' })
    res.end('aged')
  })
  await get('/aged/1')
  t.equal((await get('/aged/1')).headers['x-cache'], 'HIT')
  t.equal((await get('/aged/1', 'GET', { 'cache-control': 'max-age=50' })).headers['x-cache'], 'MISS', 'older than max-age: asked again')
  t.equal((await get('/aged/1', 'GET', { 'cache-control': 'min-fresh=550' })).headers['x-cache'], 'MISS', 'not fresh long enough')
  t.equal((await get('/aged/1', 'GET', { 'cache-control': 'max-age=300, min-fresh=60' })).headers['x-cache'], 'HIT', 'within both')
  const hits = upstream.hits('/aged/1')
  t.equal((await get('/aged/1', 'GET', { 'cache-control': 'only-if-cached' })).headers['x-cache'], 'HIT')
  const none = await get('/aged/never', 'GET', { 'cache-control': 'only-if-cached' })
  t.equal(none.status, 504)
  t.equal(JSON.parse(none.body).error, 'not_cached')
  t.equal(upstream.hits('/aged/1'), hits, 'only-if-cached never went upstream')
  t.equal(upstream.hits('/aged/never'), 0)
})

t.test('a stored response answers a conditional request; an invalid If-Modified-Since is ignored', async (t) => {
  upstream.route('/dated', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=600', etag: '"d1"', 'last-modified': 'Sun, 06 Nov 1994 08:49:37 GMT' })
    res.end('dated')
  })
  await get('/dated/1')
  t.equal((await get('/dated/1', 'GET', { 'if-none-match': 'W/"d1"' })).status, 304, 'weak comparison')
  t.equal((await get('/dated/1', 'GET', { 'if-modified-since': 'Sun, 06 Nov 1994 08:49:37 GMT' })).status, 304)
  t.equal((await get('/dated/1', 'GET', { 'if-modified-since': 'Sun, 06 Nov 1994 08:49:37 UTC' })).status, 200, 'not an HTTP-date: ignored')
  t.equal(upstream.hits('/dated/1'), 1)
})
