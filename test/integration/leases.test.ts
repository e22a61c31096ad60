import t from 'tap'
import { awayFromWindowEdge, burst, closeAgents, send } from '../helpers/client.js'
import { sumMetric } from '../helpers/load.js'
import { admin, startTogether, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * Quota leases on real processes: two instances of two workers leasing from one real Redis.
 */

const HOUR = 3_600_000
let upstream: TestUpstream
let redis: RedisProcess
let a: RunningProxy
let b: RunningProxy

t.before(async () => {
  upstream = await startUpstream()
  for (const path of ['/k2', '/h', '/high']) upstream.route(path, (_req, res) => res.end('ok'))
  redis = await startRedis()
  const config = writeConfig({
    upstream: upstream.url,
    accessLog: false,
    cache: false,
    stats: false, // only the limiter talks to Redis, so its commands can be counted
    instances: 2,
    // Generous: on a busy machine a 100 ms call to a live Redis can expire, and the local fallback then decides.
    limiterTimeout: '1s',
    redisUrl: `redis://127.0.0.1:${redis.port}`,
    limits: [
      { name: 'two-thousand', match: { path: '/k2/*' }, limit: 2_000, window: '1h' },
      { name: 'hundred', match: { path: '/h/*' }, limit: 100, window: '1h' },
      { name: 'high-path', match: { path: '/high/*' }, limit: 100_000_000, window: '1h' },
      { name: 'high-client', match: { path: '/high/*' }, per: ['ip'], limit: 100_000_000, window: '1h' },
    ],
  })
  ;[a, b] = await startTogether([['--config', config], ['--config', config]])
})
t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()])
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

t.test('a 2,000 rule under continuing load on 2 instances x 2 workers admits exactly 2,000', async (t) => {
  await awayFromWindowEdge(HOUR, 60_000)
  const r = await burst(3_000, 16, (i) => send(`${(i % 2 ? a : b).url}/k2/${i}`, { from: `127.0.0.${10 + (i % 4)}` }))
  t.same(r.errors, [])
  t.same(r.byStatus, { 200: 2_000, 429: 1_000 }, 'exactly the limit, never more')
  t.equal(await redis.client().hget('mp:rl:two-thousand', 'c'), '2000', 'Redis granted exactly 2,000 tokens')
})

t.test('tokens one instance leased and stopped using go back: another admits exactly the remaining 40 of 100', async (t) => {
  await awayFromWindowEdge(HOUR, 60_000)
  const first = await burst(60, 4, () => send(`${a.url}/h/x`))
  t.same(first.byStatus, { 200: 60 }, '60 admitted on A')
  const heldBeforePause = Number(await redis.client().hget('mp:rl:hundred', 'c'))
  t.ok(heldBeforePause >= 60, `A's workers leased ${heldBeforePause} (60 used, the rest in hand)`)
  // Unused tokens go back after about a second of disuse; a busy machine gives them back later.
  const r = redis.client()
  let held: string | null = null
  await waitFor(async () => (held = await r.hget('mp:rl:hundred', 'c')) === '60', 20_000)
  t.equal(held, '60', 'after the pause the unused tokens are back in Redis')
  const second = await burst(60, 4, () => send(`${b.url}/h/y`))
  t.same(second.byStatus, { 200: 40, 429: 20 }, 'B admits exactly the remaining 40')
  const metrics = await admin(a, '/metrics')
  t.ok(sumMetric(metrics.text, 'meliproxy_limiter_returned_tokens_total', /pool="redis"/) > 0, 'returned tokens are counted')
})

t.test('at high limits, 20,000 requests cost a small fraction of a Redis command each (scripts counted inside: a grant runs 5-6, a give-back 4)', async (t) => {
  await awayFromWindowEdge(HOUR, 60_000)
  const client = redis.client()
  await client.config('RESETSTAT')
  const n = 20_000
  const started = Date.now()
  const r = await burst(n, 32, (i) => send(`${(i % 2 ? a : b).url}/high/${i % 50}`, { from: `127.0.0.${20 + (i % 2)}` }))
  const took = Date.now() - started
  t.same(r.errors, [])
  t.same(r.byStatus, { 200: n })
  const info = await client.info('stats')
  // total_commands_processed counts what the scripts run (TIME, HMGET, HSET...) and this INFO; nothing else talks.
  const commands = Number(/total_commands_processed:(\d+)/.exec(info)![1]) - 1
  const perRequest = commands / n
  // A lease is sized for about a second of its worker's own rate, so the figure rises as a busy machine serves the
  // same requests more slowly (about 0.05 on an idle 2-core machine, 0.11 with a CPU burner beside the suite). The
  // ceiling is what a lease per request could never reach: one script, 5-6 commands, per request.
  t.ok(perRequest <= 0.25, `${commands} Redis commands for ${n} requests: ${perRequest.toFixed(4)} per request (the requests took ${took} ms)`)
  t.comment(`leases: ${commands} Redis commands for ${n} requests matching 2 rules = ${perRequest.toFixed(4)} per request`)
  const metrics = (await admin(a, '/metrics')).text + (await admin(b, '/metrics')).text
  const leases = sumMetric(metrics, 'meliproxy_limiter_leases_total', /pool="redis"/)
  const calls = sumMetric(metrics, 'meliproxy_limiter_redis_calls_total')
  const releases = sumMetric(metrics, 'meliproxy_limiter_redis_calls_total', /op="release"/)
  t.comment(`${leases} leases and ${releases} releases by the 4 workers (counted since they started)`)
  t.ok(leases > 0 && calls >= leases, `${leases} leases, ${calls} Redis calls of the limiter`)
})
