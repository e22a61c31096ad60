import t, { type Test } from 'tap'
import { awayFromWindowEdge, burst, closeAgents, send, type Got } from '../helpers/client.js'
import { admin, startMeliproxy, startTogether, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { sumMetric } from '../helpers/load.js'
import { startRedis, startSentinels } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

// 127.0.0.2 plays 152.152.152.152 from the examples; other 127.0.0.x addresses are other clients.
const IP_152 = '127.0.0.2'
const HOUR = 3_600_000

/** The three example rules, scaled down so a test can exhaust them quickly. */
const exampleRules = [
  { name: 'ip-152', match: { ip: IP_152 }, limit: 30, window: '1h' },
  { name: 'categories', match: { path: '/categories/*' }, limit: 50, window: '1h' },
  { name: 'ip-152-items', match: { ip: IP_152, path: '/items/*' }, limit: 5, window: '1h' },
]

let upstream: TestUpstream
t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/categories', (_req, res) => res.end('category'))
  upstream.route('/items', (_req, res) => res.end('item'))
  for (const path of ['/other', '/shared', '/fallback', '/failover']) upstream.route(path, (_req, res) => res.end('ok'))
})
t.teardown(async () => {
  await closeAgents()
  await upstream?.close()
})

/**
 * Admissions in the window so far: a burst, then (leases: tokens a worker holds unused go back within about a
 * second) a pause and one request at a time until one is refused. Returns the 200s of both.
 */
async function admittedInWindow(n: number, concurrency: number, make: (i: number) => Promise<Got>): Promise<{ burst: number; total: number; after: number }> {
  const first = await burst(n, concurrency, make)
  if (first.errors.length > 0) throw new Error(first.errors[0])
  const burstOk = first.byStatus[200] ?? 0
  // Unused tokens go back about half a second after their last use (a sweep every 100 ms); nothing outside the
  // workers shows when they have, so the pause is long enough for a busy machine whose timers run late.
  await new Promise((r) => setTimeout(r, 3_000))
  let after = 0
  for (let i = 0; i < n; i++) {
    const r = await make(n + i)
    if (r.status !== 200) break
    after++
  }
  return { burst: burstOk, total: burstOk + after, after }
}

/** Runs the example-rules scenario against a proxy; shared by the embedded and the Redis variants. */
async function exampleRulesScenario(t: Test, proxy: RunningProxy): Promise<number> {
  await awayFromWindowEdge(HOUR, 30_000)
  // Path rule: every client shares /categories/* (50); an allowed response carries the RateLimit fields.
  const first = await send(`${proxy.url}/categories/MLA97994`, { from: '127.0.0.3' })
  t.equal(first.status, 200)
  t.equal(first.headers['ratelimit-limit'], '50')
  t.equal(first.headers['ratelimit-remaining'], '49')
  t.ok(Number(first.headers['ratelimit-reset']) > 0, 'RateLimit-Reset is seconds until the window ends')
  const cats = await admittedInWindow(52, 8, (i) => send(`${proxy.url}/categories/MLA${i}`, { from: i % 2 ? '127.0.0.3' : '127.0.0.4' }))
  t.ok(cats.burst <= 49, `never more than the limit (${cats.burst} of 52 in the burst)`)
  t.equal(cats.total, 49, 'exactly 50 category requests in the window, from any client')
  const rejected = await send(`${proxy.url}/categories/MLA1`, { from: '127.0.0.5' })
  t.equal(rejected.status, 429)
  t.same(JSON.parse(rejected.body).rule, 'categories')
  t.ok(Number(rejected.headers['retry-after']) >= 1, 'Retry-After in seconds')
  t.equal(rejected.headers['ratelimit-remaining'], '0')

  // IP + path rule (5), inside the IP rule (30). A rejected request takes nothing from the IP rule (all-or-nothing).
  const before = upstream.hits('/items/1')
  const items = await burst(7, 1, () => send(`${proxy.url}/items/1`, { from: IP_152 }))
  t.same(items.byStatus, { 200: 5, 429: 2 }, '5 item requests for 152 in the window')
  t.equal(upstream.hits('/items/1') - before, 5, 'a rejected request never reaches the upstream')
  const items429 = await send(`${proxy.url}/items/2`, { from: IP_152 })
  t.same(JSON.parse(items429.body), {
    error: 'rate_limited',
    rule: 'ip-152-items',
    retryAfter: JSON.parse(items429.body).retryAfter,
    message: JSON.parse(items429.body).message,
  })
  const rest = await admittedInWindow(26, 4, () => send(`${proxy.url}/other`, { from: IP_152 }))
  t.ok(rest.burst <= 25, `never more than the limit (${rest.burst} of 26 in the burst)`)
  t.equal(rest.total, 25, 'IP rule: 30 in all (5 items + 25 others); the 3 rejected items took nothing')
  const other = await send(`${proxy.url}/other`, { from: '127.0.0.6' })
  t.equal(other.status, 200, 'another client is not limited by the IP rule')
  t.equal(other.headers['ratelimit-limit'], undefined, 'a request no rule governs carries no RateLimit fields')
  // The category requests refused: those of the burst, the one that ended the requests after it, and `rejected`.
  return 52 - cats.burst + 1 + 1
}

t.test('embedded (no Redis): the three example rules, exact across two workers', async (t) => {
  const proxy = await startMeliproxy(['--config', writeConfig({ upstream: upstream.url, accessLog: false, limits: exampleRules })])
  t.teardown(() => proxy.stop())
  const refused = await exampleRulesScenario(t, proxy)
  const metrics = await admin(proxy, '/metrics')
  t.equal(sumMetric(metrics.text, 'meliproxy_limiter_requests_total', /rule="categories",outcome="limited"/), refused, 'every refusal is counted')
})

t.test('standalone Redis: the example rules; two instances of two workers admit exactly L together', async (t) => {
  const redis = await startRedis()
  t.teardown(() => redis.stop())
  const config = writeConfig({
    upstream: upstream.url,
    accessLog: false,
    redisUrl: `redis://127.0.0.1:${redis.port}`,
    // Generous: on a busy machine a 100 ms call to a live Redis can expire, and the local fallback then decides.
    limiterTimeout: '1s',
    limits: [...exampleRules, { name: 'shared', match: { path: '/shared/**' }, limit: 100, window: '1h' }],
  })
  const [a, b] = await startTogether([['--config', config], ['--config', config]])
  t.teardown(() => Promise.all([a.stop(), b.stop()]))
  await exampleRulesScenario(t, a)

  await awayFromWindowEdge(HOUR, 30_000)
  const clients = ['127.0.0.10', '127.0.0.11', '127.0.0.12', '127.0.0.13']
  const result = await admittedInWindow(260, 24, (i) =>
    send(`${(i % 2 ? a : b).url}/shared/x/${i}`, { from: clients[i % clients.length] }),
  )
  t.ok(result.burst <= 100, `never more than the limit (${result.burst} of 260 in the burst)`)
  t.equal(result.total, 100, 'exactly 100 admitted across 4 workers of 2 instances')
  const stored = await redis.client().hget('mp:rl:shared', 'c')
  t.equal(stored, '100', 'the count lives in Redis')
})

t.test('per: each client gets its own bucket of the budget', async (t) => {
  const proxy = await startMeliproxy([
    '--config',
    writeConfig({ upstream: upstream.url, accessLog: false, limits: [{ name: 'per-client', per: ['ip'], limit: 3, window: '1h' }] }),
  ])
  t.teardown(() => proxy.stop())
  await awayFromWindowEdge(HOUR, 10_000)
  for (const from of ['127.0.0.20', '127.0.0.21']) {
    const r = await burst(5, 2, () => send(`${proxy.url}/other`, { from }))
    t.same(r.byStatus, { 200: 3, 429: 2 }, `client ${from} has its own 3`)
  }
})

t.test('X-Forwarded-For from an untrusted peer changes nothing; from a trusted proxy it names the client', async (t) => {
  const proxy = await startMeliproxy([
    '--trust-proxy', '127.0.0.30',
    '--config',
    writeConfig({ upstream: upstream.url, accessLog: false, limits: [{ name: 'ip-152', match: { ip: IP_152 }, limit: 2, window: '1h' }] }),
  ])
  t.teardown(() => proxy.stop())
  await awayFromWindowEdge(HOUR, 10_000)
  const spoofed = await burst(5, 1, () => send(`${proxy.url}/other`, { from: '127.0.0.31', headers: { 'x-forwarded-for': IP_152 } }))
  t.same(spoofed.byStatus, { 200: 5 }, 'an untrusted peer claiming to be 152 is not counted as 152')
  const viaProxy = await burst(4, 1, () => send(`${proxy.url}/other`, { from: '127.0.0.30', headers: { 'x-forwarded-for': `9.9.9.9, ${IP_152}` } }))
  t.same(viaProxy.byStatus, { 200: 2, 429: 2 }, 'behind the trusted proxy, the right-most untrusted entry is the client')
})

t.test('allow exempts from limits; deny answers 403 without calling the upstream', async (t) => {
  const proxy = await startMeliproxy([
    '--config',
    writeConfig({
      upstream: upstream.url,
      accessLog: false,
      allow: ['127.0.0.40'],
      deny: ['127.0.0.41/32'],
      limits: [{ name: 'all', limit: 1, window: '1h' }],
    }),
  ])
  t.teardown(() => proxy.stop())
  const allowed = await burst(4, 1, () => send(`${proxy.url}/other`, { from: '127.0.0.40' }))
  t.same(allowed.byStatus, { 200: 4 })
  const before = upstream.hits('/other')
  const denied = await send(`${proxy.url}/other`, { from: '127.0.0.41' })
  t.equal(denied.status, 403)
  t.equal(JSON.parse(denied.body).error, 'forbidden')
  t.equal(upstream.hits('/other'), before)
})

t.test('Redis stopped entirely: requests are still served, limited by the local fallback (limit / instances)', async (t) => {
  const redis = await startRedis()
  const proxy = await startMeliproxy([
    '--instances', '2',
    '--config',
    writeConfig({
      upstream: upstream.url,
      accessLog: false,
      redisUrl: `redis://127.0.0.1:${redis.port}`,
      limits: [{ name: 'ten', match: { path: '/fallback/*' }, limit: 10, window: '1h' }],
    }),
  ])
  t.teardown(() => proxy.stop())
  await awayFromWindowEdge(HOUR, 20_000)
  await redis.stop()
  const started = Date.now()
  const r = await burst(8, 1, (i) => send(`${proxy.url}/fallback/${i}`, { from: '127.0.0.50' }))
  t.same(r.errors, [])
  t.same(r.byStatus, { 200: 5, 429: 3 }, 'the fallback enforces 10 / 2 instances = 5')
  // Waiting on the dead Redis would take seconds per request; the bound leaves room for a busy machine.
  const took = Date.now() - started
  t.ok(took < 10_000, `no request waited on the dead Redis (8 requests in ${took} ms)`)
  const metrics = await admin(proxy, '/metrics')
  t.ok(sumMetric(metrics.text, 'meliproxy_limiter_fallbacks_total') >= 8, 'fallbacks are counted')
  const ready = await admin(proxy, '/readyz')
  t.equal(ready.status, 200, 'Redis down is no reason to leave the load balancer: the instance still serves')
  t.equal(ready.body.redis, 'unreachable', '/readyz reports Redis down in its body')
})

t.test('Sentinel: a SIGKILLed master fails no request, and counting resumes on the new master', async (t) => {
  const topo = await startSentinels()
  t.teardown(() => topo.stop())
  const proxy = await startMeliproxy([
    '--redis-sentinels', topo.sentinelList,
    '--config',
    writeConfig({
      upstream: upstream.url,
      accessLog: false,
      limits: [{ name: 'big', match: { path: '/failover/**' }, limit: 1_000_000, window: '1h' }],
    }),
  ])
  t.teardown(() => proxy.stop())
  const warm = await send(`${proxy.url}/failover/warm`)
  t.equal(warm.status, 200)
  // A worker whose Redis connection is still opening decides on the primary's pool; the next request leases in Redis.
  const leased = await waitFor(async () => {
    await send(`${proxy.url}/failover/warm`)
    return Number(await topo.master.client().hget('mp:rl:big', 'c')) >= 1
  }, 15_000)
  t.ok(leased, 'a lease was taken on the first master')

  const oldMaster = topo.master.port
  let promoted = false
  const load = burst(4_000, 8, async (i) => {
    if (promoted && i % 50 === 0) await new Promise((r) => setTimeout(r, 5))
    return send(`${proxy.url}/failover/${i}`)
  })
  await new Promise((r) => setTimeout(r, 300))
  topo.master.signal('SIGKILL')
  // A sentinel starved of CPU for 2 s enters TILT and acts on nothing for 30 s: the deadline allows TILT plus a failover.
  promoted = await waitFor(async () => (await topo.currentMasterPort()) !== oldMaster, 45_000)
  const result = await load
  t.ok(promoted, 'the sentinels promoted the replica')
  t.same(result.errors, [], 'no request failed')
  t.same(Object.keys(result.byStatus), ['200'], 'every request was answered 200')

  const newMaster = topo.replica.client()
  const resumed = await waitFor(async () => {
    // Tokens in hand are used first; once they run out, the next lease comes from the new master.
    const before = Number(await newMaster.hget('mp:rl:big', 'c'))
    await burst(40, 4, () => send(`${proxy.url}/failover/after`))
    const after = Number(await newMaster.hget('mp:rl:big', 'c'))
    return after > before
  }, 30_000)
  t.ok(resumed, 'requests are counted on the new master again')
})

t.test('SIGHUP with invalid rules keeps the old rules enforced; valid new rules take over', async (t) => {
  const path = writeConfig({ upstream: upstream.url, accessLog: false, limits: [{ name: 'two', limit: 2, window: '1h' }] })
  const proxy = await startMeliproxy(['--config', path])
  t.teardown(() => proxy.stop())
  await awayFromWindowEdge(HOUR, 20_000)
  const { writeFileSync } = await import('node:fs')
  writeFileSync(path, JSON.stringify({ upstream: upstream.url, accessLog: false, limits: [{ name: 'two', limit: 0, window: '1h' }] }))
  proxy.proc.kill('SIGHUP')
  t.ok(
    await waitFor(() => proxy.stderr.some((l) => l.includes('reload rejected') && l.includes('limits[0] (two).limit')), 15_000),
    'the rejection names the rule and the field',
  )
  const old = await burst(3, 1, () => send(`${proxy.url}/other`, { from: '127.0.0.60' }))
  t.same(old.byStatus, { 200: 2, 429: 1 }, 'the old rule still holds')

  writeFileSync(path, JSON.stringify({ upstream: upstream.url, accessLog: false, limits: [{ name: 'two', limit: 4, window: '1h' }] }))
  const oldWorkers = proxy.workerPids()
  proxy.proc.kill('SIGHUP')
  t.ok(await waitFor(() => proxy.stderr.some((l) => l.includes('reload complete')), 30_000), 'the reload completes')
  // Old workers finish what their open connections send them (with the old rules) before they exit.
  t.ok(await waitFor(() => proxy.workerPids().every((p) => !oldWorkers.includes(p)), 30_000), 'the old workers are gone')
  const more = await burst(3, 1, () => send(`${proxy.url}/other`, { from: '127.0.0.60' }))
  t.same(more.byStatus, { 200: 2, 429: 1 }, 'the new limit of 4 applies, and the count so far carries on')
})
