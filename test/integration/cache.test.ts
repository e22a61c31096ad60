import t from 'tap'
import { burst, closeAgents, send } from '../helpers/client.js'
import { admin, startMeliproxy, startTogether, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { steadyLoad, sumMetric } from '../helpers/load.js'
import { startRedis, startSentinels, type RedisProcess } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

const CATEGORY_CC = 'max-age=600,stale-while-revalidate=300, stale-if-error=1200'

let upstream: TestUpstream
let redis: RedisProcess
let a: RunningProxy
let b: RunningProxy
/** A switch the tests flip to make /flaky fail. */
let flakyStatus = 200
let version = 1

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/categories', (_req, res) => {
    res.writeHead(200, { 'cache-control': CATEGORY_CC, vary: 'Accept-Encoding, User-Agent', 'content-type': 'application/json' })
    res.end(JSON.stringify({ id: 'MLA97994', name: 'Celulares' }))
  })
  upstream.route('/slow-cacheable', (_req, res) => {
    setTimeout(() => {
      res.writeHead(200, { 'cache-control': 'max-age=60' })
      res.end('slow body')
    }, 300)
  })
  upstream.route('/no-store', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'no-store' })
    res.end('x')
  })
  upstream.route('/private', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'private, max-age=60' })
    res.end('x')
  })
  upstream.route('/cookie', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60', 'set-cookie': 'session=1' })
    res.end('x')
  })
  upstream.route('/auth', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end('x')
  })
  upstream.route('/auth-public', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'public, max-age=60' })
    res.end('x')
  })
  upstream.route('/q', (req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end(req.url)
  })
  upstream.route('/flaky', (_req, res) => {
    if (flakyStatus !== 200) {
      res.writeHead(flakyStatus)
      res.end('upstream trouble')
      return
    }
    res.writeHead(200, { 'cache-control': 'max-age=1, stale-if-error=60' })
    res.end(`flaky v${version}`)
  })
  // Date has whole seconds, so a response arrives up to a second old (RFC 9111 4.2.3): one of max-age=1 can be stale
  // at once. What a test expects to go stale has max-age=1; what it expects to stay fresh has a minute.
  upstream.route('/swr', (_req, res) => {
    res.writeHead(200, { 'cache-control': `max-age=${version === 1 ? 1 : 60}, stale-while-revalidate=60` })
    res.end(`swr v${version}`)
  })
  upstream.route('/etag', (req, res) => {
    if (req.headers['if-none-match'] === '"e1"') {
      res.writeHead(304, { etag: '"e1"', 'cache-control': 'max-age=60' }) // its fields replace the stored ones (4.3.4)
      res.end()
      return
    }
    const short = new URL(req.url!, 'http://x').searchParams.has('r')
    res.writeHead(200, { etag: '"e1"', 'cache-control': `max-age=${short ? 1 : 60}` })
    res.end('etag body')
  })
  upstream.route('/big', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end(Buffer.alloc(4096, 'b'))
  })
  upstream.route('/bytes', (req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=600' })
    res.end(Buffer.alloc(2048, req.url!.length % 10))
  })
  upstream.route('/items', (req, res) => {
    if (req.method === 'GET') {
      res.writeHead(200, { 'cache-control': 'max-age=600' })
      res.end(`item v${version}`)
    } else {
      res.writeHead(204, { location: '/items/moved' })
      res.end()
    }
  })
  redis = await startRedis()
  const args = ['--upstream', upstream.url, '--redis-url', `redis://127.0.0.1:${redis.port}`, '--no-access-log', '--cache-max-object', '2kb']
  ;[a, b] = await startTogether([args, args])
})

t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()])
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

t.test('a second GET within max-age is served from cache without reaching the upstream', async (t) => {
  const first = await send(`${a.url}/categories/MLA97994`, { headers: { 'user-agent': 'ua-1' } })
  t.equal(first.headers['x-cache'], 'MISS')
  const second = await send(`${a.url}/categories/MLA97994`, { headers: { 'user-agent': 'ua-1' } })
  t.equal(second.status, 200)
  t.equal(second.headers['x-cache'], 'HIT')
  t.equal(second.body, first.body)
  t.equal(second.headers['cache-control'], CATEGORY_CC, 'the upstream headers are served as stored')
  t.match(second.headers.age, /^\d+$/, 'Age is sent')
  t.equal(upstream.hits('/categories/MLA97994'), 1, 'the upstream saw one request')
})

t.test('Vary: a different User-Agent is another variant; the same one is a hit', async (t) => {
  const before = upstream.hits('/categories/MLA1')
  await send(`${a.url}/categories/MLA1`, { headers: { 'user-agent': 'ua-1' } })
  const other = await send(`${a.url}/categories/MLA1`, { headers: { 'user-agent': 'ua-2' } })
  t.equal(other.headers['x-cache'], 'MISS', 'another User-Agent misses')
  const same = await send(`${a.url}/categories/MLA1`, { headers: { 'user-agent': 'ua-2' } })
  t.equal(same.headers['x-cache'], 'HIT')
  t.equal(upstream.hits('/categories/MLA1') - before, 2)
})

t.test('no-store, private, Set-Cookie and Authorization responses are not shared', async (t) => {
  for (const path of ['/no-store', '/private', '/cookie']) {
    await send(`${a.url}${path}`)
    const again = await send(`${a.url}${path}`)
    t.not(again.headers['x-cache'], 'HIT', `${path} is not served from cache`)
    t.equal(upstream.hits(path), 2, `${path} reached the upstream both times`)
  }
  await send(`${a.url}/auth`, { headers: { authorization: 'Bearer alice' } })
  const bob = await send(`${a.url}/auth`, { headers: { authorization: 'Bearer bob' } })
  t.equal(bob.headers['x-cache'], 'MISS', "a response to an authorized request is not served to another")
  t.equal(upstream.hits('/auth'), 2)
  await send(`${a.url}/auth-public`, { headers: { authorization: 'Bearer alice' } })
  const pub = await send(`${a.url}/auth-public`, { headers: { authorization: 'Bearer bob' } })
  t.equal(pub.headers['x-cache'], 'HIT', 'unless the response says public')
})

t.test('query strings are distinct keys', async (t) => {
  const one = await send(`${a.url}/q?x=1`)
  const two = await send(`${a.url}/q?x=2`)
  t.equal(one.body, '/q?x=1')
  t.equal(two.body, '/q?x=2')
  t.equal(two.headers['x-cache'], 'MISS')
  t.equal((await send(`${a.url}/q?x=1`)).headers['x-cache'], 'HIT')
})

t.test('50 concurrent first requests over two instances reach the upstream once (Redis lease)', async (t) => {
  const r = await burst(50, 50, (i) => send(`${(i % 2 ? a : b).url}/slow-cacheable`, { from: `127.0.0.${10 + (i % 20)}` }))
  t.same(r.errors, [])
  t.same(r.byStatus, { 200: 50 })
  t.equal(upstream.hits('/slow-cacheable'), 1, 'one upstream request for all 50')
  const metrics = (await admin(a, '/metrics')).text + (await admin(b, '/metrics')).text
  t.ok(sumMetric(metrics, 'meliproxy_cache_collapsed_total') >= 1, 'collapsed requests are counted')
})

t.test('instance B serves from L2 what instance A fetched', async (t) => {
  const miss = await send(`${a.url}/q?shared=1`)
  t.equal(miss.headers['x-cache'], 'MISS')
  const fromB = await send(`${b.url}/q?shared=1`)
  t.equal(fromB.headers['x-cache'], 'HIT')
  t.equal(fromB.body, '/q?shared=1')
  t.equal(upstream.seen.filter((s) => s.url === '/q?shared=1').length, 1)
  const metrics = await admin(b, '/metrics')
  t.ok(sumMetric(metrics.text, 'meliproxy_cache_requests_total', /result="hit",tier="l2"/) >= 1, 'counted as an L2 hit')
})

t.test('a HEAD is answered from a stored GET', async (t) => {
  await send(`${a.url}/q?head=1`)
  const head = await send(`${a.url}/q?head=1`, { method: 'HEAD' })
  t.equal(head.headers['x-cache'], 'HIT')
  t.equal(head.body, '')
  t.equal(upstream.seen.filter((s) => s.url === '/q?head=1').length, 1)
})

t.test('a matching If-None-Match is answered 304 from the cache', async (t) => {
  const first = await send(`${a.url}/etag`)
  t.equal(first.status, 200)
  const hits = upstream.hits('/etag')
  const cond = await send(`${a.url}/etag`, { headers: { 'if-none-match': '"e1"' } })
  t.equal(cond.status, 304)
  t.equal(cond.headers.etag, '"e1"')
  t.equal(cond.body, '')
  t.equal(upstream.hits('/etag'), hits, 'the upstream was not asked')
})

t.test('a stale entry with a validator is revalidated; the upstream 304 refreshes it', async (t) => {
  await send(`${a.url}/etag?r=1`)
  await new Promise((r) => setTimeout(r, 1_200))
  const before = upstream.seen.length
  const again = await send(`${a.url}/etag?r=1`)
  t.equal(again.status, 200)
  t.equal(again.body, 'etag body', 'the stored body is served after a 304')
  t.equal(again.headers['x-cache'], 'HIT')
  const asked = upstream.seen.slice(before)
  t.equal(asked.length, 1)
  t.equal(asked[0]!.headers['if-none-match'], '"e1"', 'the cache asked with its validator')
  const fresh = await send(`${a.url}/etag?r=1`)
  t.equal(fresh.headers['x-cache'], 'HIT')
  t.equal(upstream.seen.length, before + 1, 'the refreshed entry is fresh again')
})

t.test('a client no-cache revalidates with the upstream', async (t) => {
  await send(`${a.url}/etag?nc=1`)
  const before = upstream.seen.length
  const r = await send(`${a.url}/etag?nc=1`, { headers: { 'cache-control': 'no-cache' } })
  t.equal(r.status, 200)
  t.equal(upstream.seen.length, before + 1, 'the upstream was asked')
})

t.test('stale-if-error serves the stored response when the upstream errors', async (t) => {
  flakyStatus = 200
  const first = await send(`${a.url}/flaky`)
  t.equal(first.body, 'flaky v1')
  await new Promise((r) => setTimeout(r, 1_200))
  flakyStatus = 503
  t.teardown(() => (flakyStatus = 200))
  const stale = await send(`${a.url}/flaky`)
  t.equal(stale.status, 200)
  t.equal(stale.body, 'flaky v1')
  t.equal(stale.headers['x-cache'], 'STALE')
  const fromB = await send(`${b.url}/flaky`)
  t.equal(fromB.status, 200, 'the other instance too, from L2')
  t.equal(fromB.headers['x-cache'], 'STALE')
})

t.test('stale-while-revalidate serves stale and refreshes once in the background', async (t) => {
  version = 1
  t.teardown(() => (version = 1))
  await send(`${a.url}/swr`)
  await new Promise((r) => setTimeout(r, 1_200))
  version = 2
  const before = upstream.hits('/swr')
  const stale = await send(`${a.url}/swr`)
  t.equal(stale.headers['x-cache'], 'STALE')
  t.equal(stale.body, 'swr v1')
  t.ok(await waitFor(() => upstream.hits('/swr') === before + 1, 15_000), 'refreshed in the background')
  const refreshed = await waitFor(async () => (await send(`${a.url}/swr`)).body === 'swr v2', 15_000)
  t.ok(refreshed, 'the refreshed response is served next')
  t.equal(upstream.hits('/swr'), before + 1, 'exactly one background refresh')
})

t.test('a successful POST invalidates the URL in every instance', async (t) => {
  version = 1
  t.teardown(() => (version = 1))
  await send(`${a.url}/items/1`)
  t.equal((await send(`${b.url}/items/1`)).headers['x-cache'], 'HIT', 'B has it')
  version = 2
  const post = await send(`${a.url}/items/1`, { method: 'POST' })
  t.equal(post.status, 204)
  t.equal(post.headers['x-cache'], 'BYPASS')
  const afterA = await send(`${a.url}/items/1`)
  t.equal(afterA.body, 'item v2', 'A fetches anew')
  // B hears of it over pub/sub: at once unless the machine is busy.
  t.ok(await waitFor(async () => (await send(`${b.url}/items/1`)).body === 'item v2', 15_000), 'B no longer serves the old one')
})

t.test('an object over the max size streams through uncached', async (t) => {
  const one = await send(`${a.url}/big`)
  t.equal(one.body.length, 4096)
  const two = await send(`${a.url}/big`)
  t.equal(two.body.length, 4096)
  t.not(two.headers['x-cache'], 'HIT')
  t.equal(upstream.hits('/big'), 2)
})

t.test('--no-cache turns the cache off', async (t) => {
  const p = await startMeliproxy(['--upstream', upstream.url, '--no-cache', '--no-access-log'], { workers: 1 })
  t.teardown(() => p.stop())
  const before = upstream.hits('/q')
  await send(`${p.url}/q?off=1`)
  const r = await send(`${p.url}/q?off=1`)
  t.equal(r.headers['x-cache'], undefined)
  t.equal(upstream.hits('/q') - before, 2)
})

t.test('L1 stays within its byte bound under many distinct URLs', async (t) => {
  const bound = 100 * 1024
  const p = await startMeliproxy(['--upstream', upstream.url, '--cache-l1-size', '100kb', '--no-access-log'], { workers: 1 })
  t.teardown(() => p.stop())
  const r = await burst(300, 8, (i) => send(`${p.url}/bytes/${i}`))
  t.same(r.byStatus, { 200: 300 })
  const metrics = await admin(p, '/metrics')
  const bytes = sumMetric(metrics.text, 'meliproxy_cache_l1_bytes')
  t.ok(bytes > 50 * 1024, `L1 is in use (${bytes} bytes)`)
  t.ok(bytes <= bound, `L1 holds ${bytes} <= ${bound} bytes`)
  t.ok(sumMetric(metrics.text, 'meliproxy_cache_l1_entries') < 300, 'older entries were evicted')
})

t.test('Sentinel: a SIGKILLed Redis master mid-test causes no client error', async (t) => {
  const topo = await startSentinels()
  t.teardown(() => topo.stop())
  const p = await startMeliproxy(['--upstream', upstream.url, '--redis-sentinels', topo.sentinelList, '--no-access-log'])
  t.teardown(() => p.stop())
  let n = 0
  const urls = ['/categories/MLA5', '/q?sentinel=1', '/no-store', '/q?sentinel=2']
  let killed!: () => void
  const afterFailover = new Promise<void>((r) => (killed = r))
  const load = steadyLoad({ url: () => `${p.url}${urls[n++ % urls.length]}`, concurrency: 6, maxRequests: 200_000, maxMs: 60_000, until: afterFailover })
  await new Promise((r) => setTimeout(r, 300))
  const oldMaster = topo.master.port
  topo.master.signal('SIGKILL')
  // A sentinel starved of CPU for 2 s enters TILT and acts on nothing for 30 s: the deadline allows TILT plus a failover.
  const promoted = await waitFor(async () => (await topo.currentMasterPort()) !== oldMaster, 45_000)
  await new Promise((r) => setTimeout(r, 1_000))
  killed()
  const result = await load
  t.ok(promoted, 'the replica was promoted')
  t.same(result.errors, [], 'no client error')
  t.same(Object.keys(result.byStatus), ['200'], `every one of ${result.sent} requests was answered 200`)
  const stored = await waitFor(async () => {
    await send(`${p.url}/q?after-failover=1`)
    return (await topo.replica.client().exists(`mp:c:${upstream.url}/q?after-failover=1`)) === 1
  }, 30_000)
  t.ok(stored, 'L2 is used again on the new master')
})
