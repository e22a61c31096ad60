import { readFileSync } from 'node:fs'
import t from 'tap'
import { awayFromWindowEdge, closeAgents, send } from '../helpers/client.js'
import { admin, adminCall, startMeliproxy, startTogether, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * Statistics and the admin API with two real instances (two workers each) sharing a real Redis: totals add up
 * exactly across instances, survive a restart, and rule changes on one instance are enforced by the other.
 */

const TOKEN = 'stats-test-token'
const HOUR = 3_600_000
let upstream: TestUpstream
let redis: RedisProcess
let a: RunningProxy
let b: RunningProxy
let args: string[]

t.before(async () => {
  upstream = await startUpstream()
  for (const prefix of ['/items', '/categories']) {
    upstream.route(prefix, (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' })
      res.end('{}')
    })
  }
  redis = await startRedis()
  args = ['--upstream', upstream.url, '--redis-url', `redis://127.0.0.1:${redis.port}`, '--admin-token', TOKEN]
  ;[a, b] = await startTogether([args, args])
})
t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()])
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

const totals = async (p: RunningProxy): Promise<number> => (await admin(p, '/api/stats')).body?.totals?.requests ?? -1

t.test('statistics from two instances sharing Redis add up exactly to the requests sent', async (t) => {
  const sent: Record<string, number> = {}
  for (let i = 0; i < 30; i++) {
    const from = `127.0.0.${2 + (i % 3)}`
    await send(`${a.url}/items/MLA${i % 5}`, { from })
    sent[from] = (sent[from] ?? 0) + 1
  }
  for (let i = 0; i < 20; i++) await send(`${b.url}/categories/MLA${1000 + i}?attributes=id`, { from: '127.0.0.5' })
  sent['127.0.0.5'] = 20
  // Generous deadlines for the statistics flushes (about once a second): a busy machine delays them.
  let seen = -1
  t.ok(await waitFor(async () => (seen = await totals(a)) === 50, 20_000), `A reports the 50 requests sent to A and B (saw ${seen})`)
  await new Promise((r) => setTimeout(r, 1_500))
  t.equal(await totals(a), 50, 'and no more after further flushes')
  t.equal(await totals(b), 50, 'B reports the same')

  const routes = (await admin(a, '/api/stats?group=route')).body
  t.same(
    routes.top.map((r: { key: string; requests: number }) => [r.key, r.requests]),
    [['/items/:id', 30], ['/categories/:id', 20]],
    'IDs are normalised into routes',
  )
  t.same(routes.totals.status, { '2xx': 50 })
  t.equal(routes.resolution, 'minute')
  t.ok(routes.series.length >= 1 && routes.series.reduce((n: number, p: { requests: number }) => n + p.requests, 0) === 50, 'the series adds up to the totals')
  t.ok(routes.totals.p50Ms > 0 && routes.totals.p99Ms >= routes.totals.p50Ms, 'latency percentiles')

  const ips = (await admin(a, '/api/stats?group=ip&limit=10')).body.top
  t.same(Object.fromEntries(ips.map((r: { key: string; requests: number }) => [r.key, r.requests])), sent, 'requests per client IP')
  const pairs = (await admin(b, '/api/stats?group=pair&limit=1')).body.top
  t.equal(pairs.length, 1, 'limit applies')
  // The busiest pairs: 127.0.0.5 sent one request to each of 20 distinct paths; each 127.0.0.x on /items sent 2.
  t.match(pairs[0], { key: /^127\.0\.0\.[2-4] \/items\/MLA[0-4]$/, requests: 2, ip: /^127\.0\.0\.[2-4]$/, path: /^\/items\/MLA[0-4]$/ })
  const methods = (await admin(a, '/api/stats?group=method')).body.top
  t.same(methods, [{ key: 'GET', requests: 50 }])
})

t.test('statistics survive a restart of every instance', async (t) => {
  await Promise.all([a.stop(), b.stop()])
  ;[a, b] = await startTogether([args, args])
  t.equal(await totals(a), 50, 'the restarted instance reads what was stored')
  await send(`${b.url}/items/MLA1`, { from: '127.0.0.6' })
  let seen = -1
  t.ok(await waitFor(async () => (seen = await totals(a)) === 51, 20_000), `and adds to it (saw ${seen})`)
})

t.test('statistics counted while Redis hangs are written once it answers again, once', async (t) => {
  redis.signal('SIGSTOP')
  try {
    for (let i = 0; i < 10; i++) t.equal((await send(`${a.url}/categories/MLA${i}`, { from: '127.0.0.7' })).status, 200)
    await new Promise((r) => setTimeout(r, 2_500)) // a few flushes find Redis hanging
  } finally {
    redis.signal('SIGCONT')
  }
  let seen = -1
  t.ok(await waitFor(async () => (seen = await totals(a)) === 61, 30_000), `the 10 requests are in the totals (saw ${seen})`)
  await new Promise((r) => setTimeout(r, 2_000))
  t.equal(await totals(a), 61, 'exactly once')
})

t.test('statistics query parameters are validated with a code and the field', async (t) => {
  for (const [q, field] of [
    ['group=bogus', 'group'],
    ['limit=0', 'limit'],
    ['limit=abc', 'limit'],
    ['from=yesterday-ish', 'from'],
    ['from=now&to=now-1h', 'from'],
  ]) {
    const r = await admin(a, `/api/stats?${q}`)
    t.equal(r.status, 400, q)
    t.equal(r.body.error, 'bad_request', q)
    t.equal(r.body.field, field, q)
  }
  const old = await admin(a, `/api/stats?from=${Date.now() - 3 * 86_400_000}&to=now-2d`)
  t.equal(old.status, 200)
  t.equal(old.body.resolution, 'hour', 'long ranges come from hourly rollups')
  t.equal(old.body.totals.requests, 0, 'nothing was sent then')
  const day = await admin(a, '/api/stats?from=now-1d')
  t.equal(day.body.resolution, 'hour')
  t.equal(day.body.totals.requests, 61, 'the hourly rollup holds the same requests')
})

const RULE = { name: 'items-ip', match: { path: '/items/*' }, per: ['ip'], limit: 3, window: '1h' }

async function statuses(p: RunningProxy, from: string, n: number): Promise<number[]> {
  const out: number[] = []
  for (let i = 0; i < n; i++) out.push((await send(`${p.url}/items/x${i}`, { from })).status)
  return out
}

t.test('PUT /api/limits on A is enforced by B (how soon is reported), persisted, versioned', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  const unauth = await adminCall(a, 'PUT', '/api/limits', { body: { limits: [RULE] } })
  t.equal(unauth.status, 401)
  t.equal(unauth.body.error, 'unauthorized')
  const wrong = await adminCall(a, 'PUT', '/api/limits', { body: { limits: [RULE] }, token: 'nope' })
  t.equal(wrong.status, 401)
  t.same(await statuses(b, '127.0.0.20', 5), [200, 200, 200, 200, 200], 'no rule yet')

  const put = await adminCall(a, 'PUT', '/api/limits', { body: { limits: [RULE] }, token: TOKEN })
  t.equal(put.status, 200)
  t.ok(put.body.version >= 1)
  t.same(put.body.limits, [{ ...RULE, match: { path: ['/items/*'] } }], 'stored in the normalised form GET returns')
  const applied = Date.now()
  const onB = await waitFor(async () => (await send(`${b.url}/items/probe`, { from: '127.0.0.21' })).status === 200 &&
    (await admin(b, '/api/limits')).body.version === put.body.version, 15_000)
  // How soon is reported, not asserted (about a pub/sub round trip; far longer on a busy machine).
  t.ok(onB, `B has the new version (after ${Date.now() - applied} ms; B's version is ${(await admin(b, '/api/limits')).body.version})`)
  t.same(await statuses(b, '127.0.0.22', 5), [200, 200, 200, 429, 429], 'B enforces it')
  t.same(await statuses(a, '127.0.0.22', 1), [429], 'A shares the count')

  const bad = await adminCall(a, 'PUT', '/api/limits', {
    body: { limits: [{ ...RULE, limit: 0 }] },
    token: TOKEN,
  })
  t.equal(bad.status, 400)
  t.equal(bad.body.error, 'invalid_rules')
  t.match(bad.body.field, /limits\[0\] \(items-ip\)\.limit/)
  for (const body of [{ limits: 'x' }, { rules: [] }, [], 'not json{']) {
    const r = await adminCall(a, 'PUT', '/api/limits', { body, token: TOKEN })
    t.equal(r.status, 400, JSON.stringify(body))
    t.ok(['invalid_rules', 'invalid_json'].includes(r.body.error), r.body.error)
  }
  t.equal((await admin(a, '/api/limits')).body.version, put.body.version, 'the old rules stay in force')
  t.same(await statuses(a, '127.0.0.23', 4), [200, 200, 200, 429], 'and are enforced')

  let byRule: unknown = null
  const limited = await waitFor(async () => {
    const r = (await admin(a, '/api/stats?group=rule')).body
    byRule = r.top
    return r.top[0]?.key === 'items-ip' && r.top[0]?.requests === 4
  }, 20_000)
  t.ok(limited, `the 429s are counted per rule (saw ${JSON.stringify(byRule)})`)

  const history = (await admin(a, '/api/limits/history')).body.versions
  t.equal(history[0].version, put.body.version, 'newest first')
  t.equal(history[history.length - 1].version, 0, 'version 0 is the config file')

  const restarted = await startMeliproxy(args)
  t.teardown(() => restarted.stop())
  t.equal((await admin(restarted, '/api/limits')).body.version, put.body.version, 'a new instance starts with the stored rules')
  t.same(await statuses(restarted, '127.0.0.22', 1), [429], 'and enforces them')
})

t.test('POST /api/limits/reset clears one bucket or a whole rule', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  t.same(await statuses(a, '127.0.0.24', 4), [200, 200, 200, 429])
  t.same(await statuses(a, '127.0.0.25', 4), [200, 200, 200, 429])
  const unauth = await adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip' } })
  t.equal(unauth.status, 401)
  const unknown = await adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'nope' }, token: TOKEN })
  t.equal(unknown.status, 404)
  t.equal(unknown.body.error, 'not_found')
  const one = await adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip', key: '127.0.0.24' }, token: TOKEN })
  t.equal(one.status, 200)
  t.same(one.body, { rule: 'items-ip', key: '127.0.0.24', generation: 0, cleared: 1 })
  t.same(await statuses(b, '127.0.0.24', 1), [200], 'that client may pass again on every instance')
  t.same(await statuses(b, '127.0.0.25', 1), [429], 'the other is still limited')
  const all = await adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip' }, token: TOKEN })
  t.same(all.body, { rule: 'items-ip', key: null, generation: 1 }, 'the rule starts its next generation')
  // B's workers heard "full" for that client a moment ago; the reset reaches them over pub/sub within milliseconds.
  t.ok(await waitFor(async () => (await statuses(b, '127.0.0.25', 1))[0] === 200, 15_000), 'the whole rule is reset on B too')
})

t.test('rollback stores an earlier version again as the newest', async (t) => {
  const before = (await admin(a, '/api/limits')).body.version
  const missing = await adminCall(a, 'POST', '/api/limits/rollback', { body: { version: 9999 }, token: TOKEN })
  t.equal(missing.status, 404)
  const r = await adminCall(a, 'POST', '/api/limits/rollback', { body: { version: 0 }, token: TOKEN })
  t.equal(r.status, 200)
  t.equal(r.body.version, before + 1)
  t.equal(r.body.source, 'rollback')
  t.same(r.body.limits, [], 'the config file had no rules')
  t.ok(await waitFor(async () => (await admin(b, '/api/limits')).body.version === before + 1, 15_000),
    `B has the rollback (version ${(await admin(b, '/api/limits')).body.version}, expected ${before + 1})`)
  t.same(await statuses(b, '127.0.0.22', 3), [200, 200, 200], 'no limit any more')
})

t.test('status, OpenAPI, unknown endpoints and methods', async (t) => {
  // The role is asked of Redis with a 500 ms limit (null past it, which a busy machine can hit): asked again until it comes.
  let s: any = null
  await waitFor(async () => (s = (await admin(a, '/api/status')).body).redis?.role !== null, 10_000)
  t.match(s, {
    version: String,
    uptimeSeconds: Number,
    workers: { desired: 2, listening: 2, restarts: 0 },
    redis: { configured: true, mode: 'standalone', state: 'ready', role: 'master' },
    rules: { version: Number, source: 'rollback' },
    stats: { enabled: true, store: 'redis' },
  })
  t.equal(s.workers.pids.length, 2)
  const doc = (await admin(a, '/api/openapi.json')).body
  t.equal(doc.openapi, '3.1.0')
  for (const path of ['/api/stats', '/api/limits', '/api/limits/history', '/api/limits/rollback', '/api/limits/reset', '/api/cache', '/api/status']) {
    t.ok(doc.paths[path], `OpenAPI describes ${path}`)
  }
  const nf = await admin(a, '/api/nothing')
  t.equal(nf.status, 404)
  t.equal(nf.body.error, 'not_found')
  const na = await adminCall(a, 'POST', '/api/stats', { token: TOKEN })
  t.equal(na.status, 405)
  t.equal(na.body.error, 'method_not_allowed')
  t.notOk(a.stderr.concat(a.stdout).some((l) => l.includes(TOKEN)), 'the token never appears in the logs')
})

t.test('every metric config/grafana-dashboard.json queries is one /metrics exposes', async (t) => {
  await send(`${a.url}/categories/MLA1`) // a cache lookup and a limiter-free request, so every family has samples
  const exposed = new Set(
    (await admin(a, '/metrics')).text
      .split('\n')
      .filter((l) => l.startsWith('# TYPE '))
      .map((l) => l.split(' ')[2]),
  )
  const dashboard = JSON.parse(readFileSync(new URL('../../config/grafana-dashboard.json', import.meta.url), 'utf8'))
  const exprs: string[] = dashboard.panels.flatMap((p: { targets: { expr: string }[] }) => p.targets.map((x) => x.expr))
  const used = new Set(exprs.flatMap((e) => e.match(/meliproxy_[a-z0-9_]+/g) ?? []).map((n) => n.replace(/_(bucket|sum|count)$/, '')))
  t.ok(used.size >= 15, `${used.size} metrics used`)
  for (const name of used) t.ok(exposed.has(name), `${name} is exposed`)
})

t.test('PUT /api/limits takes the rule features: each bad field is 400 naming it; a good set is stored as written and enforced by B', async (t) => {
  const bad = await adminCall(a, 'PUT', '/api/limits', {
    body: { limits: [{ name: 'tb', limit: 10, window: '1m', algorithm: 'token-bucket', burst: 5, cost: 6 }] },
    token: TOKEN,
  })
  t.equal(bad.status, 400)
  t.equal(bad.body.error, 'invalid_rules')
  t.equal(bad.body.field, 'limits[0] (tb).cost')
  t.match(bad.body.message, /6 is above the burst 5/)
  const rules = [
    { name: 'sl', match: { path: ['/categories/*'] }, algorithm: 'sliding', limit: 2, window: '1h' },
    { name: 'sh', match: { path: ['/categories/*'] }, limit: 1, window: '1h', mode: 'shadow' },
  ]
  const put = await adminCall(a, 'PUT', '/api/limits', { body: { limits: rules }, token: TOKEN })
  t.equal(put.status, 200)
  t.same(put.body.limits, rules, 'stored as written')
  t.ok(await waitFor(async () => (await admin(b, '/api/limits')).body.version === put.body.version, 15_000), 'B has it')
  const got: number[] = []
  for (let i = 0; i < 3; i++) got.push((await send(`${b.url}/categories/sl${i}`, { from: '127.0.0.30' })).status)
  t.same(got, [200, 200, 429], 'the sliding rule is enforced; the shadow rule at 1 rejects nothing')
})
