import t from 'tap'
import { closeAgents, send } from '../helpers/client.js'
import { admin, startMeliproxy, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { sumMetric } from '../helpers/load.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * The upstream circuit breaker and retries, with the real binary (one worker, so one breaker) and a real upstream
 * whose behaviour the test switches.
 */

let upstream: TestUpstream
let proxy: RunningProxy
let mode: 'ok' | 'fail' | 'hang' = 'ok'

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/svc', (_req, res) => {
    if (mode === 'hang') return // never answers: the proxy's headers timeout fires
    if (mode === 'fail') {
      res.writeHead(503, { 'content-type': 'text/plain' })
      res.end('down')
      return
    }
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=1, stale-if-error=60' })
    res.end('fine')
  })
  let resets = 0
  upstream.route('/reset-once', (req, res) => {
    if (resets++ % 2 === 0) return req.socket.destroy() // a connection reset before any response byte
    res.writeHead(200, { 'cache-control': 'no-store' })
    res.end('second try')
  })
  proxy = await startMeliproxy(
    ['--upstream', upstream.url, '--breaker-failures', '3', '--breaker-open-time', '1s', '--headers-timeout', '300ms'],
    { workers: 1 },
  )
})
t.teardown(async () => {
  await proxy?.stop()
  await closeAgents()
  await upstream?.close()
})

const metric = async (name: string): Promise<number> => sumMetric((await admin(proxy, '/metrics')).text, name)

t.test('three failures open the breaker: 503 with Retry-After and no upstream request, until a probe succeeds', async (t) => {
  mode = 'hang'
  for (let i = 0; i < 3; i++) t.equal((await send(`${proxy.url}/svc/x?n=${i}`)).status, 504, 'timeouts count as failures')
  const seen = upstream.hits('/svc/x')
  const refused = await send(`${proxy.url}/svc/x?n=after`)
  t.equal(refused.status, 503)
  t.equal(JSON.parse(refused.body).error, 'upstream_circuit_open')
  t.equal(refused.headers['retry-after'], '1')
  t.equal(upstream.hits('/svc/x'), seen, 'the upstream was not asked')
  const ready = await admin(proxy, '/readyz')
  t.equal(ready.status, 200, 'an open breaker does not take the instance out of the load balancer')
  t.equal(ready.body.upstreamBreaker, 'open')
  t.equal((await admin(proxy, '/api/status')).body.upstreamBreaker.state, 'open')
  t.equal(await metric('meliproxy_upstream_breaker_state'), 2)
  t.ok((await metric('meliproxy_upstream_breaker_refused_total')) >= 1)

  mode = 'fail'
  await new Promise((r) => setTimeout(r, 1_100))
  t.equal((await send(`${proxy.url}/svc/x?n=probe1`)).status, 503, 'the probe reaches the failing upstream')
  t.equal(upstream.hits('/svc/x'), seen + 1, 'one probe')
  t.equal(JSON.parse((await send(`${proxy.url}/svc/x?n=refused`)).body).error, 'upstream_circuit_open', 'open again')

  mode = 'ok'
  await new Promise((r) => setTimeout(r, 1_100))
  t.equal((await send(`${proxy.url}/svc/x?n=probe2`)).status, 200, 'a successful probe')
  const after: number[] = []
  for (let i = 0; i < 5; i++) after.push((await send(`${proxy.url}/svc/x?n=closed${i}`)).status)
  t.same(after, [200, 200, 200, 200, 200], 'closed again')
  t.ok(await waitFor(async () => (await admin(proxy, '/readyz')).body.upstreamBreaker === 'closed', 2_000))
  t.equal(await metric('meliproxy_upstream_breaker_state'), 0)
})

t.test('while the breaker is open, stale content is served where stale-if-error allows', async (t) => {
  mode = 'ok'
  t.equal((await send(`${proxy.url}/svc/cached`)).headers['x-cache'], 'MISS')
  await new Promise((r) => setTimeout(r, 1_100)) // stale now (max-age=1), usable on error for 60 s
  mode = 'fail'
  for (let i = 0; i < 3; i++) await send(`${proxy.url}/svc/fail-${i}`)
  t.equal(JSON.parse((await send(`${proxy.url}/svc/other`)).body).error, 'upstream_circuit_open', 'the breaker is open')
  const seen = upstream.hits('/svc/cached')
  const stale = await send(`${proxy.url}/svc/cached`)
  t.equal(stale.status, 200)
  t.equal(stale.body, 'fine')
  t.equal(stale.headers['x-cache'], 'STALE')
  t.equal(upstream.hits('/svc/cached'), seen, 'served without asking the upstream')
  mode = 'ok'
  await new Promise((r) => setTimeout(r, 1_100))
  await send(`${proxy.url}/svc/probe`)
})

t.test('a connection reset before any response byte is retried for idempotent requests only', async (t) => {
  const before = await metric('meliproxy_upstream_retries_total')
  const get = await send(`${proxy.url}/reset-once/a`)
  t.equal(get.status, 200)
  t.equal(get.body, 'second try')
  t.equal(upstream.hits('/reset-once/a'), 2, 'the upstream saw both attempts')
  t.equal((await metric('meliproxy_upstream_retries_total')) - before, 1)
  const post = await send(`${proxy.url}/reset-once/b`, { method: 'POST' })
  t.equal(post.status, 502, 'a POST is never retried')
  t.equal(upstream.hits('/reset-once/b'), 1)
})
