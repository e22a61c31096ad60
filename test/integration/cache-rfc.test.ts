import t from 'tap'
import { closeAgents, send } from '../helpers/client.js'
import { rawExchange } from '../helpers/raw.js'
import { startMeliproxy, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * RFC 9111 / 9213 details on real processes (2 workers sharing Redis): one Age on a hit, strict HTTP-dates,
 * invalidation by any method not known to be safe, targeted cache-control fields.
 */

let upstream: TestUpstream
let redis: RedisProcess
let proxy: RunningProxy

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/aged', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=600', age: '30' }) // behind a CDN, as api.mercadolibre.com is
    res.end('aged')
  })
  upstream.route('/expires', (req, res) => {
    const value = decodeURIComponent(new URL(req.url!, 'http://x').searchParams.get('e')!)
    res.writeHead(200, { expires: value, date: new Date().toUTCString() })
    res.end('expires')
  })
  upstream.route('/msearch', (req, res) => {
    res.writeHead(200, req.method === 'GET' ? { 'cache-control': 'max-age=600' } : {})
    res.end(`${req.method} ${upstream.hits('/msearch/x')}`)
  })
  upstream.route('/cdn', (req, res) => {
    const [, , kind] = req.url!.split('/')
    const headers: Record<string, string> = { 'cache-control': 'max-age=600' }
    if (kind === 'no-store') headers['cdn-cache-control'] = 'no-store'
    if (kind === 'longer') (headers['cache-control'] = 'no-cache'), (headers['cdn-cache-control'] = 'max-age=600')
    if (kind === 'ours') (headers['cdn-cache-control'] = 'max-age=600'), (headers['meliproxy-cache-control'] = 'no-store')
    res.writeHead(200, headers)
    res.end(kind)
  })
  redis = await startRedis()
  proxy = await startMeliproxy([
    '--config',
    writeConfig({ upstream: upstream.url, redisUrl: `redis://127.0.0.1:${redis.port}`, cacheTargetedField: 'Meliproxy-Cache-Control' }),
  ])
})
t.teardown(async () => {
  await proxy?.stop()
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

t.test('a hit carries one Age, the cache\'s, counting the upstream\'s (RFC 9111 4.2.3, 5.1)', async (t) => {
  t.equal((await send(`${proxy.url}/aged/1`)).headers['x-cache'], 'MISS')
  for (let i = 0; i < 4; i++) {
    const hit = await send(`${proxy.url}/aged/1`)
    t.equal(hit.headers['x-cache'], 'HIT')
    t.equal(typeof hit.headers.age, 'string', 'one Age field, not a list')
    t.ok(Number(hit.headers.age) >= 30, `Age ${hit.headers.age} includes the upstream's 30`)
  }
})

t.test('only the three HTTP-date forms are valid; any other Expires is already stale', async (t) => {
  const valid = ['Thu, 18 Aug 2050 02:01:18 GMT', 'Thursday, 18-Aug-50 02:01:18 GMT', 'Thu Aug 18 02:01:18 2050']
  const invalid = [
    'Thu, 18 Aug 2050 02:01:18 UTC', // another zone name
    'Thu 18 Aug 2050 02:01:18 GMT', // no comma
    'Thu,  18 Aug 2050 02:01:18 GMT', // an extra space
    'Thu, 18-Aug-2050 02:01:18 GMT', // dashes
    'Thu, 18 Aug 2050 2:01:18 GMT', // a one-digit hour
    '2050-08-18T02:01:18Z',
  ]
  for (const [i, e] of valid.entries()) {
    await send(`${proxy.url}/expires/v${i}?e=${encodeURIComponent(e)}`)
    t.equal((await send(`${proxy.url}/expires/v${i}?e=${encodeURIComponent(e)}`)).headers['x-cache'], 'HIT', `"${e}" is valid: fresh`)
  }
  for (const [i, e] of invalid.entries()) {
    await send(`${proxy.url}/expires/i${i}?e=${encodeURIComponent(e)}`)
    const again = await send(`${proxy.url}/expires/i${i}?e=${encodeURIComponent(e)}`)
    t.not(again.headers['x-cache'], 'HIT', `"${e}" is invalid: stale at once`)
  }
})

t.test('a successful request with a method not known to be safe (M-SEARCH) invalidates the URL', async (t) => {
  await send(`${proxy.url}/msearch/x`)
  t.equal((await send(`${proxy.url}/msearch/x`)).headers['x-cache'], 'HIT')
  const m = await send(`${proxy.url}/msearch/x`, { method: 'M-SEARCH' })
  t.equal(m.status, 200)
  t.equal((await send(`${proxy.url}/msearch/x`)).headers['x-cache'], 'MISS', 'the next GET goes upstream on every worker')
})

t.test('CDN-Cache-Control, and the operator\'s own targeted field, win over Cache-Control (RFC 9213)', async (t) => {
  const twice = async (path: string): Promise<string | string[] | undefined> => {
    await send(`${proxy.url}${path}`)
    return (await send(`${proxy.url}${path}`)).headers['x-cache']
  }
  t.equal(await twice('/cdn/plain'), 'HIT', 'Cache-Control alone: stored')
  t.equal(await twice('/cdn/no-store'), 'MISS', 'CDN-Cache-Control: no-store beats Cache-Control: max-age=600')
  t.equal(await twice('/cdn/longer'), 'HIT', 'CDN-Cache-Control: max-age beats Cache-Control: no-cache')
  t.equal(await twice('/cdn/ours'), 'MISS', 'the configured Meliproxy-Cache-Control beats CDN-Cache-Control')
})

t.test('after one worker revalidates a stale response (304), the other serves the refreshed copy from L2: one conditional request in all', async (t) => {
  let conditional = 0
  upstream.route('/reval', (req, res) => {
    if (req.headers['if-none-match'] === '"v1"') {
      conditional++
      // A minute: Date has whole seconds, so a refreshed copy of max-age=2 could have little over a second left.
      res.writeHead(304, { etag: '"v1"', 'cache-control': 'max-age=60' })
      return res.end()
    }
    res.writeHead(200, { etag: '"v1"', 'cache-control': 'max-age=2' })
    res.end('reval')
  })
  // Distinct source addresses make distinct connections, which the kernel spreads over both workers.
  const sources = Array.from({ length: 8 }, (_, i) => `127.0.0.${120 + i}`)
  for (const from of sources) await send(`${proxy.url}/reval/1`, { from })
  t.equal(upstream.hits('/reval/1'), 1, 'stored once for both workers')
  await new Promise((r) => setTimeout(r, 2_100)) // stale everywhere
  const seen: (string | string[] | undefined)[] = []
  for (const from of sources) seen.push((await send(`${proxy.url}/reval/1`, { from })).headers['x-cache'])
  t.equal(conditional, 1, `one revalidation for both workers (answers: ${seen.join(', ')})`)
  t.same(new Set(seen), new Set(['HIT']), 'every request answered from the cache')
  // The access log is written in batches: the 16 lines of the two rounds are waited for (later on a busy machine).
  const logged = () => proxy.stdout.filter((l) => l.includes('"path":"/reval/1"')).length
  t.ok(await waitFor(() => logged() >= 2 * sources.length, 15_000), `both rounds are in the access log (${logged()} lines)`)
  const workers = proxy.stdout
    .filter((l) => l.includes('"path":"/reval/1"'))
    .slice(-sources.length)
    .map((l) => JSON.parse(l).worker as number)
  t.equal(new Set(workers).size, 2, 'both workers answered after the response went stale')
})

t.test('an upstream 103 Early Hints reaches the client before its answer, and is never stored', async (t) => {
  upstream.route('/hints', (_req, res) => {
    res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style' })
    setTimeout(() => {
      res.writeHead(200, { 'cache-control': 'max-age=600' })
      res.end('with hints')
    }, 50)
  })
  const first = await rawExchange(proxy.port, 'GET /hints/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  t.match(first, /^HTTP\/1\.1 103 Early Hints\r\n[\s\S]*link: <\/style\.css>; rel=preload; as=style\r\n[\s\S]*HTTP\/1\.1 200 OK/i, '103 first, then 200')
  const hit = await rawExchange(proxy.port, 'GET /hints/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  t.match(hit, /^HTTP\/1\.1 200 OK/, 'the stored answer is the final one')
  t.match(hit, /x-cache: HIT/i)
})
