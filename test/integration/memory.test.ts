import { readFileSync } from 'node:fs'
import t from 'tap'
import { closeAgents } from '../helpers/client.js'
import { steadyLoad, sumMetric } from '../helpers/load.js'
import { admin, startMeliproxy } from '../helpers/meliproxy.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * A short version of `npm run bench -- --soak`: many distinct cacheable URLs through a small L1. L1 stays within its
 * byte bound and each worker's RSS within that bound plus the fixed overhead README states (180 MB).
 */

const L1_MB = 16
const OVERHEAD_MB = 180
let upstream: TestUpstream

t.before(async () => {
  upstream = await startUpstream()
  const body = Buffer.alloc(2_500, 'x')
  upstream.route('/items', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=600', etag: '"v1"' })
    res.end(body)
  })
})
t.teardown(async () => {
  await closeAgents()
  await upstream?.close()
})

const rssMb = (pid: number): number => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) / 1024

t.test(`distinct URLs through a ${L1_MB} MB L1: L1 bytes and worker RSS stay bounded`, async (t) => {
  const proxy = await startMeliproxy(['--upstream', upstream.url, '--cache-l1-size', `${L1_MB}mb`, '--no-access-log'])
  t.teardown(() => proxy.stop())
  const workers = proxy.workerPids()
  let n = 0
  const peak = workers.map(rssMb)
  const sampler = setInterval(() => workers.forEach((pid, i) => (peak[i] = Math.max(peak[i]!, rssMb(pid)))), 250)
  // 8,000 distinct entries of about 7.7 KB are near twice what the two workers' L1s hold: enough to evict however slow
  // the machine is (the time bound only stops a machine too busy to send them).
  const result = await steadyLoad({ url: () => `${proxy.url}/items/MLA${n++ % 30_000}`, concurrency: 16, maxRequests: 8_000, maxMs: 40_000 })
  clearInterval(sampler)
  workers.forEach((pid, i) => (peak[i] = Math.max(peak[i]!, rssMb(pid))))
  t.same(result.errors, [])
  t.same(Object.keys(result.byStatus), ['200'])
  const metrics = (await admin(proxy, '/metrics')).text
  const l1 = sumMetric(metrics, 'meliproxy_cache_l1_bytes')
  const entries = sumMetric(metrics, 'meliproxy_cache_l1_entries')
  t.ok(l1 <= workers.length * L1_MB * 1024 * 1024, `L1 holds ${(l1 / 1048576).toFixed(1)} MB in ${entries} entries`)
  t.ok(entries < Math.min(result.sent, 30_000), `entries were evicted (${result.sent} requests)`)
  for (const [i, mb] of peak.entries()) {
    t.ok(mb <= L1_MB + OVERHEAD_MB, `worker ${i + 1} peak RSS ${mb.toFixed(0)} MB <= ${L1_MB} + ${OVERHEAD_MB} MB`)
  }
  t.comment(`memory: ${result.sent} requests over ${Math.min(result.sent, 30_000)} URLs; peak RSS ${peak.map((v) => v.toFixed(0)).join(', ')} MB`)
})
