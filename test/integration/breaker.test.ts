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
  upstream.route('/healthy', (_req, res) => res.end('fine'))
  upstream.route('/sick', (_req, res) => {
    res.writeHead(503, { 'content-type': 'text/plain' })
    res.end('this route is down')
  })
  let resets = 0
  upstream.route('/reset-once', (req, res) => {
    if (resets++ % 2 === 0) return req.socket.destroy() // a connection reset before any response byte
    res.writeHead(200, { 'cache-control': 'no-store' })
    res.end('second try')
  })
  proxy = await startMeliproxy(
    // --headers-timeout: short for the hanging upstream, long enough that a busy machine does not turn an ordinary
    // answer into a 504 (a failure the breaker would count).
    ['--upstream', upstream.url, '--breaker-failures', '3', '--breaker-open-time', '1s', '--headers-timeout', '1s'],
    { workers: 1 },
  )
})
t.teardown(async () => {
  await proxy?.stop()
  await closeAgents()
  await upstream?.close()
})

const metric = async (name: string): Promise<number> => sumMetric((await admin(proxy, '/metrics')).text, name)

t.test('three timeouts on a route open its breaker: 503 with Retry-After for that route only, until a probe succeeds', async (t) => {
  mode = 'hang'
  for (let i = 0; i < 3; i++) t.equal((await send(`${proxy.url}/svc/x?n=${i}`)).status, 504, 'timeouts count as failures')
  const seen = upstream.hits('/svc/x')
  const refused = await send(`${proxy.url}/svc/x?n=after`)
  t.equal(refused.status, 503)
  t.equal(JSON.parse(refused.body).error, 'route_circuit_open')
  t.match(JSON.parse(refused.body).message, '/svc/x', 'the error names the route')
  t.equal(refused.headers['retry-after'], '1')
  t.equal(upstream.hits('/svc/x'), seen, 'the upstream was not asked')
  t.equal((await send(`${proxy.url}/healthy/1`)).status, 200, 'another route is still served')
  const ready = await admin(proxy, '/readyz')
  t.equal(ready.status, 200, 'an open breaker does not take the instance out of the load balancer')
  t.same(ready.body.openRoutes, ['/svc/x'], '/readyz lists the open route')
  t.equal(ready.body.upstreamBreaker, 'closed', 'the upstream as a whole is fine')
  t.same((await admin(proxy, '/api/status')).body.routeBreakers.open, ['/svc/x'])
  t.equal(await metric('meliproxy_route_breakers_open'), 1)
  t.equal(await metric('meliproxy_upstream_breaker_state'), 0)
  t.ok((await metric('meliproxy_upstream_breaker_refused_total')) >= 1)

  mode = 'fail'
  await new Promise((r) => setTimeout(r, 1_100))
  t.equal((await send(`${proxy.url}/svc/x?n=probe1`)).status, 503, 'the probe reaches the failing upstream')
  t.equal(upstream.hits('/svc/x'), seen + 1, 'one probe')
  t.equal(JSON.parse((await send(`${proxy.url}/svc/x?n=refused`)).body).error, 'route_circuit_open', 'open again')

  mode = 'ok'
  await new Promise((r) => setTimeout(r, 1_100))
  t.equal((await send(`${proxy.url}/svc/x?n=probe2`)).status, 200, 'a successful probe')
  const after: number[] = []
  for (let i = 0; i < 5; i++) after.push((await send(`${proxy.url}/svc/x?n=closed${i}`)).status)
  t.same(after, [200, 200, 200, 200, 200], 'closed again')
  let open: unknown = null
  t.ok(await waitFor(async () => (open = (await admin(proxy, '/readyz')).body.openRoutes).length === 0, 10_000), `no open route in /readyz (${JSON.stringify(open)})`)
  t.equal(await metric('meliproxy_route_breakers_open'), 0)
})

t.test('while a route breaker is open, stale content is served where stale-if-error allows', async (t) => {
  mode = 'ok'
  t.equal((await send(`${proxy.url}/svc/cached`)).headers['x-cache'], 'MISS')
  await new Promise((r) => setTimeout(r, 1_100)) // stale now (max-age=1), usable on error for 60 s
  mode = 'fail'
  for (let i = 0; i < 3; i++) await send(`${proxy.url}/svc/cached?fail=${i}`) // the same route, other URLs
  t.equal(JSON.parse((await send(`${proxy.url}/svc/cached?other`)).body).error, 'route_circuit_open', 'the route is open')
  const seen = upstream.hits('/svc/cached')
  const stale = await send(`${proxy.url}/svc/cached`)
  t.equal(stale.status, 200)
  t.equal(stale.body, 'fine')
  t.equal(stale.headers['x-cache'], 'STALE')
  t.equal(upstream.hits('/svc/cached'), seen, 'served without asking the upstream')
  mode = 'ok'
  await new Promise((r) => setTimeout(r, 1_100))
  await send(`${proxy.url}/svc/cached?probe`)
})

t.test('default flags, 2 workers: 30 upstream 503s on one route open its breaker; other routes keep getting 200', async (t) => {
  const two = await startMeliproxy(['--upstream', upstream.url])
  t.teardown(() => two.stop())
  const sick: number[] = []
  const healthy: number[] = []
  for (let i = 0; i < 30; i++) {
    sick.push((await send(`${two.url}/sick/${i}`)).status)
    healthy.push((await send(`${two.url}/healthy/${i}`)).status)
  }
  t.same(new Set(sick), new Set([503]), 'the sick route answers 503 (the upstream\'s, then the breaker\'s)')
  t.same(new Set(healthy), new Set([200]), 'every request to a healthy route was served')
  const reached = upstream.hits('/sick')
  t.ok(reached <= 12, `the upstream saw ${reached} of the 30 sick requests: each worker's breaker opened after 5`)
  t.equal((await admin(two, '/readyz')).status, 200)
  t.same((await admin(two, '/api/status')).body.routeBreakers.open, ['/sick/:id'], 'the open route, by its route name')
})

t.test('with the upstream gone, every route gets 503 + Retry-After at once, without trying it', async (t) => {
  const { freePort } = await import('../helpers/ports.js')
  const gone = await startMeliproxy(['--upstream', `http://127.0.0.1:${await freePort()}`, '--breaker-failures', '3'], { workers: 1 })
  t.teardown(() => gone.stop())
  // The first GET is refused, retried (connection failures of idempotent requests are), refused again: the three
  // failures open the upstream-wide breaker.
  t.equal((await send(`${gone.url}/a/1`)).status, 502, 'connection refused: 502')
  const answers: { error: string; retryAfter: unknown; ms: number }[] = []
  for (const path of ['/categories/MLA1', '/items/MLA2', '/sites/MLA', '/users/1']) {
    const started = performance.now()
    const r = await send(`${gone.url}${path}`)
    answers.push({ error: JSON.parse(r.body).error, retryAfter: r.headers['retry-after'], ms: performance.now() - started })
  }
  t.same(answers.map((a) => a.error), Array(4).fill('upstream_circuit_open'), 'every route is refused by the upstream-wide breaker')
  t.ok(answers.every((a) => Number(a.retryAfter) >= 1), 'each with Retry-After')
  const worst = Math.max(...answers.map((a) => a.ms))
  // Waiting on anything (a connect timeout is 5 s) would take seconds; the bound leaves room for a busy machine.
  t.ok(worst < 4_000, `answered without waiting on anything (slowest ${worst.toFixed(1)} ms)`)
  t.comment(`upstream gone: 503 in ${answers.map((a) => a.ms.toFixed(1)).join(', ')} ms`)
  t.equal((await admin(gone, '/readyz')).body.upstreamBreaker, 'open')
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
