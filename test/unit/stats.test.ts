import t from 'tap'
import { ConfigError } from '../../src/errors.js'
import { dimsKey, mergeBatches } from '../../src/stats/batch.js'
import type { StatsBatch } from '../../src/stats/types.js'
import { bucketUpperMs, latencyBucket, percentile } from '../../src/stats/latency.js'
import { summarize } from '../../src/stats/query.js'
import { StatsRecorder } from '../../src/stats/recorder.js'
import { parseRoutePatterns, RouteNamer } from '../../src/stats/routes.js'
import { MemoryStatsStore } from '../../src/stats/store.js'
import { TopK } from '../../src/stats/topk.js'

t.test('route names: IDs become :id, operator patterns win', async (t) => {
  const plain = new RouteNamer([])
  t.equal(plain.name('/categories/MLA97994'), '/categories/:id')
  t.equal(plain.name('/items/MLA1/description'), '/items/:id/description')
  t.equal(plain.name('/sites'), '/sites')
  t.equal(plain.name('/'), '/')
  const named = new RouteNamer(['/users/:user/items', '/sites/:site', '/static/*'])
  t.equal(named.name('/users/alice/items'), '/users/:user/items', 'a segment without digits matched by :user')
  t.equal(named.name('/sites/MLA'), '/sites/:site')
  t.equal(named.name('/static/css/app.css'), '/static/*')
  t.equal(named.name('/users/alice'), '/users/alice', 'no pattern matches: literal segments kept')
  t.throws(() => parseRoutePatterns(['items/:id']), ConfigError)
  t.throws(() => parseRoutePatterns(['/a/*/b']), /\* may only end/)
  t.throws(() => parseRoutePatterns('/x'), ConfigError)
  t.same(parseRoutePatterns(['/a/:id']), ['/a/:id'])
})

t.test('TopK keeps the heavy hitters exactly within bounded memory', async (t) => {
  const top = new TopK(10)
  for (let i = 0; i < 5_000; i++) {
    top.add(`rare-${i}`)
    if (i % 10 === 0) top.add('heavy-a')
    if (i % 25 === 0) top.add('heavy-b', 2)
  }
  t.ok(top.size <= 20, `held ${top.size} keys`)
  const [first, second] = top.top()
  t.same(first, ['heavy-a', 500])
  t.same(second, ['heavy-b', 400])
})

t.test('latency buckets: percentiles within 10% above the true value', async (t) => {
  const hist = new Map<number, number>()
  for (let ms = 1; ms <= 100; ms++) {
    const b = latencyBucket(ms)
    t.ok(bucketUpperMs(b) >= ms - 1e-9 && bucketUpperMs(b) <= ms * 1.1 + 1e-9, `${ms} ms in a bucket up to ${bucketUpperMs(b)}`)
    hist.set(b, (hist.get(b) ?? 0) + 1)
  }
  const p50 = percentile(hist, 0.5)!
  const p99 = percentile(hist, 0.99)!
  t.ok(p50 >= 50 && p50 <= 55, `p50 ${p50}`)
  t.ok(p99 >= 99 && p99 <= 109, `p99 ${p99}`)
  t.equal(percentile(new Map(), 0.5), null)
  t.equal(latencyBucket(0), 0)
  t.equal(latencyBucket(1e9), latencyBucket(1e10), 'the last bucket holds everything longer')
})

t.test('recorder -> merged batches -> memory store -> summary', async (t) => {
  const minute = Date.UTC(2026, 10, 28, 10, 5)
  const rec = new StatsRecorder(new RouteNamer([]))
  const req = (i: number, over: Partial<{ path: string; ip: string; cache: string; limitedBy: string; method: string }> = {}) => ({
    time: minute + i * 1000,
    path: `/items/MLA${i % 3}`,
    method: 'GET',
    ip: `10.0.0.${i % 2}`,
    cache: 'MISS',
    limitedBy: undefined,
    shadowLimitedBy: undefined,
    ...over,
  })
  for (let i = 0; i < 10; i++) rec.record(req(i), 200, 2)
  rec.record(req(11, { limitedBy: 'items' }), 429, 0.1)
  rec.record(req(12, { method: 'BREW', cache: undefined }), 502, 100)
  rec.record({ ...req(0), time: minute + 61_000 }, 200, 3) // the next minute
  const first = rec.take()
  t.equal(first.length, 2, 'one batch per minute touched')
  t.same(rec.take(), [], 'taken once')
  rec.record(req(1), 200, 2)
  const merged = mergeBatches([...first, ...rec.take()], 100)
  t.equal(merged.length, 2)
  t.equal(merged[0]!.counts.find(([k]) => k === dimsKey('/items/:id', 'GET', '2xx', 'MISS', ''))![1], 11)

  const store = new MemoryStatsStore({ minute: 48 * 3_600_000, hour: 30 * 86_400_000 }, () => minute + 120_000)
  await store.apply(merged)
  const buckets = await store.read('minute', minute, minute + 120_000)
  t.equal(buckets.length, 2)
  const s = summarize(buckets, { from: minute, to: minute + 120_000, group: 'route', limit: 10 }, 'minute')
  t.equal(s.totals.requests, 14)
  t.same(s.totals.status, { '2xx': 12, '4xx': 1, '5xx': 1 })
  t.same(s.totals.cache, { MISS: 13 }, 'a request the cache never saw is not a cache outcome')
  t.equal(s.totals.limited, 1)
  t.same(s.top, [{ key: '/items/:id', requests: 14 }])
  t.same(s.series.map((p) => p.requests), [13, 1])
  const byMethod = summarize(buckets, { from: minute, to: minute + 120_000, group: 'method', limit: 10 }, 'minute')
  t.same(byMethod.top, [{ key: 'GET', requests: 13 }, { key: 'OTHER', requests: 1 }], 'unknown methods are bounded')
  const byRule = summarize(buckets, { from: minute, to: minute + 120_000, group: 'rule', limit: 10 }, 'minute')
  t.same(byRule.top, [{ key: 'items', requests: 1 }], 'only limited requests count per rule')
  const hours = await store.read('hour', minute - (minute % 3_600_000), minute + 120_000)
  t.equal(hours.length, 1, 'the hourly rollup holds both minutes')
  t.same(
    summarize(hours, { from: minute, to: minute, group: 'ip', limit: 2 }, 'hour').top.map((r) => r.requests),
    [7, 7],
    'both clients, over both minutes',
  )
})

t.test('memory store drops buckets past their retention', async (t) => {
  let now = Date.UTC(2026, 10, 28, 10, 0)
  const store = new MemoryStatsStore({ minute: 5 * 60_000, hour: 3_600_000 }, () => now)
  const batch = (minute: number): StatsBatch => ({ minute, counts: [['k', 1]], latency: [[1, 1]], ips: [], paths: [], pairs: [] })
  await store.apply([batch(now)])
  now += 10 * 60_000
  await store.apply([batch(now)])
  t.equal((await store.read('minute', 0, now)).length, 1, 'the old minute is gone')
  t.equal((await store.read('hour', 0, now)).length, 1, 'the hour is kept')
})
