import { createServer } from 'node:net'
import t from 'tap'
import { closeAgents } from '../helpers/client.js'
import { sumMetric, steadyLoad } from '../helpers/load.js'
import { admin, startMeliproxy, waitFor } from '../helpers/meliproxy.js'
import { freePort } from '../helpers/ports.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/** Worker crashes under load, and a crash loop that must not become a fork bomb. */

let upstream: TestUpstream
t.before(async () => {
  upstream = await startUpstream()
})
t.teardown(async () => {
  await closeAgents()
  await upstream?.close()
})

t.test('a worker SIGKILLed under load: only its in-flight requests may fail; a replacement serves within 1 s', async (t) => {
  const proxy = await startMeliproxy(['--upstream', upstream.url, '--no-access-log'])
  t.teardown(() => proxy.stop())
  let stop!: () => void
  const until = new Promise<void>((r) => (stop = r))
  const concurrency = 8
  const load = steadyLoad({ url: `${proxy.url}/echo/load`, concurrency, maxRequests: 50_000, maxMs: 15_000, until })
  await new Promise((r) => setTimeout(r, 1_000))
  const [victim, survivor] = proxy.workerPids()
  const killedAt = Date.now()
  process.kill(victim!, 'SIGKILL')
  const replaced = await waitFor(async () => {
    const pids = proxy.workerPids()
    return pids.length === 2 && !pids.includes(victim!) && (await admin(proxy, '/readyz')).body.workers.listening === 2
  }, 1_000)
  const replacedMs = Date.now() - killedAt
  t.ok(replaced, `a replacement listened ${replacedMs} ms after the kill`)
  await new Promise((r) => setTimeout(r, 1_500))
  stop()
  const result = await load
  const failed = result.errors.length + Object.entries(result.byStatus).filter(([s]) => Number(s) >= 500).reduce((n, [, c]) => n + c, 0)
  t.ok(failed <= concurrency, `${failed} of ${result.sent} requests failed: at most the ${concurrency} that could be in flight`)
  t.ok(proxy.workerPids().includes(survivor!), 'the other worker kept serving')
  t.equal(sumMetric((await admin(proxy, '/metrics')).text, 'meliproxy_worker_restarts_total'), 1)
  t.comment(`worker crash under load: ${failed} failed of ${result.sent}; replacement listening after ${replacedMs} ms`)
})

t.test('workers that die at start back off (no fork bomb), say so in the log, and /readyz is 503', async (t) => {
  // Workers cannot listen on a port another process holds: each one dies as it starts.
  const port = await freePort()
  const squatter = createServer().listen(port, '127.0.0.1')
  await new Promise((r) => squatter.once('listening', r))
  t.teardown(() => new Promise<void>((r) => squatter.close(() => r())))
  const proxy = await startMeliproxy(['--upstream', upstream.url], { port, waitReady: false })
  t.teardown(() => proxy.stop())
  await new Promise((r) => setTimeout(r, 3_000))
  const ready = await admin(proxy, '/readyz')
  t.equal(ready.status, 503)
  t.match(ready.body.reasons, ['no worker is listening'])
  const restarts = sumMetric((await admin(proxy, '/metrics')).text, 'meliproxy_worker_restarts_total')
  // Backoff 0, 100, 200, 400, 800, 1600 ms ...: in 3 s a slot is refilled at most 6 times (2 workers: 12 deaths).
  t.ok(restarts >= 2 && restarts <= 14, `${restarts} workers replaced in 3 s`)
  t.ok(proxy.stderr.some((l) => l.includes('worker crash loop: backing off')), 'the log says so')
  const status = (await admin(proxy, '/api/status')).body
  t.equal(status.workers.listening, 0)
})
