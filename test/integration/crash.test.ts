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

t.test('a worker SIGKILLed under load: only its in-flight requests may fail; a replacement takes its place', async (t) => {
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
  // How fast is reported, not asserted: on a busy machine a fork takes longer (a generous deadline only).
  const replaced = await waitFor(async () => {
    const pids = proxy.workerPids()
    return pids.length === 2 && !pids.includes(victim!) && (await admin(proxy, '/readyz')).body.workers.listening === 2
  }, 15_000)
  const replacedMs = Date.now() - killedAt
  t.ok(replaced, 'a replacement listens')
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
  const startedAt = Date.now()
  const proxy = await startMeliproxy(['--upstream', upstream.url], { port, waitReady: false })
  t.teardown(() => proxy.stop())
  // The primary's own count (/metrics also asks every worker, which a crash loop can make time out).
  const restartsNow = async (): Promise<number> => {
    try {
      return Number((await admin(proxy, '/api/status')).body.workers.restarts)
    } catch {
      return 0 // the admin listener is not up yet
    }
  }
  // Generous deadlines: a busy machine forks slowly; what is checked is that workers are replaced, and not too often.
  t.ok(await waitFor(async () => (await restartsNow()) >= 4, 30_000), 'dead workers are replaced')
  t.ok(await waitFor(() => proxy.stderr.some((l) => l.includes('worker crash loop: backing off')), 10_000), 'the log says so')
  const ready = await admin(proxy, '/readyz')
  t.equal(ready.status, 503)
  t.match(ready.body.reasons, ['no worker is listening'])
  await new Promise((r) => setTimeout(r, 2_000))
  const restarts = await restartsNow()
  const elapsed = Date.now() - startedAt
  // Backoff 0, 100, 200, 400, ... ms per slot: in `elapsed` ms a slot is refilled at most about log2(elapsed/100)+2
  // times, however fast the machine (without backoff it would be once per worker start, tens a second).
  const bound = 2 * (Math.ceil(Math.log2(elapsed / 100 + 1)) + 2)
  t.ok(restarts <= bound, `${restarts} workers replaced in ${elapsed} ms: at most ${bound} with backoff`)
  t.comment(`crash loop: ${restarts} workers replaced in ${elapsed} ms`)
  const status = (await admin(proxy, '/api/status')).body
  t.equal(status.workers.listening, 0)
})
