import { readFileSync } from 'node:fs'
import t from 'tap'
import { Redis } from 'ioredis'
import { Client } from 'undici'
import { shapeOf } from '../../src/limiter/pool.js'
import type { Giveback, LeaseRequest } from '../../src/limiter/types.js'
import { RedisPool } from '../../src/limiter/redis-pool.js'
import { awayFromWindowEdge, closeAgents, send } from '../helpers/client.js'
import { sumMetric } from '../helpers/load.js'
import { admin, startMeliproxy, startTogether, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'
import { startRelay } from '../helpers/relay.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * Issue 19, "Done when": the limiter is exact at the edges, shown on real processes. Two instances of two workers
 * share one real Redis (the embedded case runs one instance without Redis). Every load loop is bounded in count and
 * time; durations are printed with t.comment and only bounded by generous deadlines (2 shared cores).
 */

const HOUR = 3_600_000
/**
 * What a token bucket may admit beyond burst + rate x T over a span T, in this test: README states no excess at all;
 * one token covers the millisecond granularity of Redis's clock against the test's (T is measured here, outside).
 */
const BUCKET_EXCESS = 1
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

let upstream: TestUpstream
let redis: RedisProcess
let a: RunningProxy
let b: RunningProxy

const WEIGHTED_ROUNDS = 4

t.before(async () => {
  upstream = await startUpstream()
  const paths = ['/tb10', '/tb2', '/d3', '/d05', '/e', ...Array.from({ length: WEIGHTED_ROUNDS }, (_, i) => `/w${i}`)]
  for (const path of paths) upstream.route(path, (_req, res) => res.end('ok'))
  redis = await startRedis()
  const config = writeConfig({
    upstream: upstream.url,
    accessLog: false,
    cache: false,
    stats: false,
    instances: 2,
    // Generous: on a busy machine a 200 ms call to a live Redis can expire, and the local fallback then decides.
    limiterTimeout: '1s',
    redisUrl: `redis://127.0.0.1:${redis.port}`,
    limits: [
      { name: 'tb10', match: { path: '/tb10/*' }, algorithm: 'token-bucket', limit: 10, window: '1s', burst: 5 },
      { name: 'tb2', match: { path: '/tb2/*' }, algorithm: 'token-bucket', limit: 2, window: '2s', burst: 1 },
      { name: 'd3', match: { path: '/d3/*' }, algorithm: 'token-bucket', limit: 2, window: '2s', burst: 1, onExceed: 'delay', maxDelay: '3s' },
      { name: 'd05', match: { path: '/d05/*' }, algorithm: 'token-bucket', limit: 2, window: '2s', burst: 1, onExceed: 'delay', maxDelay: '500ms' },
      ...Array.from({ length: WEIGHTED_ROUNDS }, (_, i) => ({ name: `w${i}`, match: { path: `/w${i}/*` }, limit: 10, window: '1h', cost: 5 })),
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

/** One GET over a fresh connection from `from` (a new connection is what the primary hands to its next worker). */
async function fresh(url: string, from: string): Promise<{ status: number; ms: number; headers: Record<string, unknown> }> {
  const u = new URL(url)
  const client = new Client(u.origin, { localAddress: from, headersTimeout: 15_000, bodyTimeout: 15_000 })
  const t0 = performance.now()
  try {
    const res = await client.request({ method: 'GET', path: u.pathname + u.search })
    await res.body.dump()
    return { status: res.statusCode, ms: Math.round(performance.now() - t0), headers: res.headers }
  } finally {
    await client.close()
  }
}

/** What one paced client saw: admissions, and the span the bucket surely saw (inner) and at most saw (outer). */
interface Paced {
  sent: number
  admitted: number
  byStatus: Record<number, number>
  errors: string[]
  innerMs: number
  outerMs: number
  /** When each request was sent (ms since the first). */
  sentAt: number[]
}

/**
 * What one exact token bucket (one process, no leases) admits for requests arriving at `times` (ms): burst + rate x T
 * when the requests keep coming faster than the rate, fewer when the client fell behind (a slow machine).
 */
function idealBucket(times: number[], burst: number, perSecond: number): number {
  let level = burst
  let prev = times[0] ?? 0
  let admitted = 0
  for (const at of times) {
    level = Math.min(burst, level + ((at - prev) * perSecond) / 1000)
    prev = at
    if (level >= 1 - 1e-9) {
      // (sums of fractions of a token are not exact in floating point: 20 x 0.05 can be just under 1)
      level -= 1
      admitted++
    }
  }
  return admitted
}

/**
 * One client sending a request every `periodMs` (never faster: a late answer delays the next send) for `ms`,
 * alternating the two instances and two source addresses (so it reaches every worker). Bounded by count and time.
 */
async function paced(path: string, ms: number, periodMs: number, addresses: [string, string]): Promise<Paced> {
  const out: Paced = { sent: 0, admitted: 0, byStatus: {}, errors: [], innerMs: 0, outerMs: 0, sentAt: [] }
  const maxRequests = Math.ceil(ms / periodMs) + 1
  const begin = performance.now()
  let firstStart = 0
  let firstEnd = 0
  let lastStart = 0
  let lastEnd = 0
  for (let i = 0; i < maxRequests && performance.now() - begin < ms; i++) {
    const started = performance.now()
    try {
      const r = await send(`${(i % 2 ? a : b).url}${path}/${i}`, { from: addresses[(i >> 1) % 2] })
      out.byStatus[r.status] = (out.byStatus[r.status] ?? 0) + 1
      if (r.status === 200) out.admitted++
    } catch (err) {
      out.errors.push((err as Error).message)
    }
    const ended = performance.now()
    out.sentAt.push(started - begin)
    if (i === 0) {
      firstStart = started
      firstEnd = ended
    }
    lastStart = started
    lastEnd = ended
    out.sent++
    await sleep(Math.max(0, started + periodMs - performance.now()))
  }
  out.innerMs = Math.max(0, lastStart - firstEnd)
  out.outerMs = lastEnd - firstStart
  return out
}

t.test('a token bucket sustains its rate: at least 0.95 x (burst + rate x T), at most burst + rate x T + a stated excess', async (t) => {
  // Both rules at once (separate buckets, separate clients): about 20 requests a second each, twice the faster rate.
  const cases = [
    { path: '/tb10', burst: 5, perSecond: 10, ms: 9_000, addresses: ['127.0.0.30', '127.0.0.31'] as [string, string] },
    { path: '/tb2', burst: 1, perSecond: 1, ms: 10_300, addresses: ['127.0.0.32', '127.0.0.33'] as [string, string] },
  ]
  const results = await Promise.all(cases.map((c) => paced(c.path, c.ms, 50, c.addresses)))
  for (const [i, c] of cases.entries()) {
    const r = results[i]!
    const span = c.burst + (c.perSecond * r.innerMs) / 1000
    // The lower bound is burst + rate x T while the client keeps sending faster than the rate; on a machine so busy
    // that it fell behind, what one exact bucket would have admitted for the same arrivals (never more than that).
    const exact = idealBucket(r.sentAt, c.burst, c.perSecond)
    // 95% of it, or all of it but one token: a small count (11 in 10 s at 1/s) cannot lose 5% without losing one, and
    // a burst-1 bucket may lose a token to lease timing (docs/rate-limits.md: the sustained rate).
    const low = Math.min(0.95 * Math.min(span, exact), Math.min(span, exact) - 1)
    const high = c.burst + (c.perSecond * r.outerMs) / 1000 + BUCKET_EXCESS
    const gaps = r.sentAt.slice(1).map((at, j) => at - r.sentAt[j]!)
    t.comment(
      `${c.path} (rate ${c.perSecond}/s, burst ${c.burst}): ${r.admitted} admitted of ${r.sent} sent over ${(r.outerMs / 1000).toFixed(2)} s` +
        ` (longest gap between sends ${Math.round(Math.max(...gaps))} ms); burst + rate x T = ${span.toFixed(1)} to` +
        ` ${(c.burst + (c.perSecond * r.outerMs) / 1000).toFixed(1)}; an exact bucket on the same arrivals: ${exact}; ${JSON.stringify(r.byStatus)}`,
    )
    t.same(r.errors, [], `${c.path}: no request failed`)
    t.ok(r.sent >= (c.ms / 50) * 0.5, `${c.path}: the client kept up its rate (${r.sent} sent)`)
    t.same(Object.keys(r.byStatus).filter((s) => s !== '200' && s !== '429'), [], `${c.path}: only 200 and 429`)
    t.ok(r.admitted >= low, `${c.path}: sustains its rate: ${r.admitted} admitted >= 0.95 x ${Math.min(span, exact).toFixed(1)} (or all but one) = ${low.toFixed(1)}`)
    t.ok(r.admitted <= high, `${c.path}: never more than burst + rate x T + ${BUCKET_EXCESS}: ${r.admitted} <= ${high.toFixed(1)}`)
  }
  // Only these two rules have run so far: tokens leased and not admitted were given back, or lost (a lease that ended
  // before it was used counts as used).
  const metrics = (await admin(a, '/metrics')).text + (await admin(b, '/metrics')).text
  const leased = sumMetric(metrics, 'meliproxy_limiter_leased_tokens_total')
  const returned = sumMetric(metrics, 'meliproxy_limiter_returned_tokens_total')
  const admitted = results.reduce((n, r) => n + r.admitted, 0)
  t.comment(`both rules: ${leased} tokens leased, ${returned} given back, ${admitted} admitted: ${leased - returned - admitted} unused`)
})

t.test('delay delivers: three delayed requests on a rate of 1/s (burst 1) are all admitted, about one a second', async (t) => {
  // maxDelay 3s: one at once, then one per second; the last is due at about 2 s, the bound is N / r = 3 s (+ slack).
  for (let round = 0; round < 2; round++) {
    if (round > 0) await sleep(2_500) // the bucket is full again (one token a second, burst 1)
    const r = await Promise.all([
      fresh(`${a.url}/d3/${round}-0`, '127.0.0.40'),
      fresh(`${b.url}/d3/${round}-1`, '127.0.0.41'),
      fresh(`${a.url}/d3/${round}-2`, '127.0.0.42'),
    ])
    const times = r.map((x) => x.ms)
    const seen = [...r].sort((p, q) => p.ms - q.ms).map((x) => `${x.status} after ${x.ms} ms`)
    t.comment(`round ${round}: ${seen.join(', ')} (N / r = 3000 ms)`)
    t.same(r.map((x) => x.status), [200, 200, 200], `round ${round}: all three admitted`)
    // The slack is for a busy machine (how long is in the comment above); a request held past its turn still fails it.
    t.ok(Math.max(...times) <= 3_000 + 4_000, `round ${round}: the last within N / r + slack (${Math.max(...times)} ms)`)
  }
})

t.test('delay that cannot be met is refused at once: maxDelay 500ms, three at once on 1/s (burst 1)', async (t) => {
  const r = await Promise.all([
    fresh(`${a.url}/d05/0`, '127.0.0.43'),
    fresh(`${b.url}/d05/1`, '127.0.0.44'),
    fresh(`${a.url}/d05/2`, '127.0.0.45'),
  ])
  const refused = r.filter((x) => x.status === 429).map((x) => x.ms)
  t.comment(`statuses ${r.map((x) => x.status).join(', ')}; refusals after ${refused.join(', ')} ms (maxDelay 500 ms)`)
  t.equal(r.filter((x) => x.status === 200).length, 1, 'the one token there is: one admitted')
  t.equal(refused.length, 2, 'the second needs about 1 s and the third 2 s, more than maxDelay: both refused')
})

t.test('weighted: four cost-5 requests at once on a limit of 10 over 2 x 2 workers admit exactly 2', async (t) => {
  for (let round = 0; round < WEIGHTED_ROUNDS; round++) {
    await awayFromWindowEdge(HOUR, 30_000)
    // Four fresh connections from four addresses, two to each instance: each primary hands them to both its workers.
    const r = await Promise.all(
      [a, a, b, b].map((p, i) => fresh(`${p.url}/w${round}/${i}`, `127.0.0.${50 + round * 4 + i}`)),
    )
    const statuses = r.map((x) => x.status).sort()
    const retryAfter = r.filter((x) => x.status === 429).map((x) => x.headers['retry-after'])
    t.comment(`round ${round} (rule w${round}): ${statuses.join(', ')}; Retry-After of the refused: ${retryAfter.join(', ')}`)
    t.same(statuses, [200, 200, 429, 429], `round ${round}: exactly 2 admitted, 2 refused`)
    const more = await fresh(`${b.url}/w${round}/more`, `127.0.0.${50 + round * 4}`)
    t.equal(more.status, 429, `round ${round}: the 10 are used: one more is refused`)
    if (round === 0) {
      // Unused leased tokens go back within about a second: if they were counted right, nothing comes back.
      await sleep(1_500)
      const later = await fresh(`${a.url}/w${round}/later`, `127.0.0.${50 + round * 4 + 1}`)
      t.equal(later.status, 429, `round ${round}: 1.5 s later one more is still refused`)
    }
  }
})

t.test('embedded (no Redis): a 4 s stall of the primary under load admits nothing beyond the limit of 50', async (t) => {
  const proxy = await startMeliproxy([
    '--config',
    writeConfig({
      upstream: upstream.url,
      accessLog: false,
      cache: false,
      stats: false,
      instances: 1,
      limits: [{ name: 'e', match: { path: '/e/*' }, limit: 50, window: '1h' }],
    }),
  ])
  t.teardown(() => proxy.stop())
  await awayFromWindowEdge(HOUR, 60_000)
  const primary = proxy.proc.pid!
  // Eight clients, one keep-alive connection each (opened before the stall: a stopped primary hands out no new
  // connection), each sending every 400 ms: about 20 requests a second in all.
  const lanes = 8
  const periodMs = 400
  const runMs = 9_000
  const stopAt = 1_000
  const stallMs = 4_000
  const clients = Array.from({ length: lanes }, (_, i) => new Client(proxy.url, { localAddress: `127.0.0.${80 + i}`, headersTimeout: 20_000, bodyTimeout: 20_000 }))
  const answers: { status: number; at: number }[] = []
  const errors: string[] = []
  const begin = performance.now()
  let stoppedAt = -1
  let resumedAt = -1
  let state = ''
  const lane = async (client: Client, i: number): Promise<void> => {
    await sleep((i * periodMs) / lanes)
    for (let n = 0; n < Math.ceil(runMs / periodMs) + 1 && performance.now() - begin < runMs; n++) {
      const started = performance.now()
      try {
        const res = await client.request({ method: 'GET', path: `/e/${i}-${n}` })
        await res.body.dump()
        answers.push({ status: res.statusCode, at: performance.now() - begin })
      } catch (err) {
        errors.push((err as Error).message)
      }
      await sleep(Math.max(0, started + periodMs - performance.now()))
    }
  }
  const stall = (async () => {
    await sleep(stopAt)
    process.kill(primary, 'SIGSTOP')
    stoppedAt = performance.now() - begin
    try {
      await sleep(200)
      state = /\) (\S)/.exec(readFileSync(`/proc/${primary}/stat`, 'utf8'))?.[1] ?? '?'
      await sleep(stallMs - 200)
    } finally {
      process.kill(primary, 'SIGCONT')
      resumedAt = performance.now() - begin
    }
  })()
  try {
    await Promise.all([stall, ...clients.map(lane)])
  } finally {
    process.kill(primary, 'SIGCONT')
    await Promise.all(clients.map((c) => c.close()))
  }
  const byStatus: Record<number, number> = {}
  for (const x of answers) byStatus[x.status] = (byStatus[x.status] ?? 0) + 1
  const admitted = byStatus[200] ?? 0
  const before = answers.filter((x) => x.status === 200 && x.at < stoppedAt).length
  const during = answers.filter((x) => x.status === 200 && x.at >= stoppedAt && x.at < resumedAt).length
  const answeredDuring = answers.filter((x) => x.at >= stoppedAt && x.at < resumedAt).length
  t.comment(
    `primary ${primary} stopped (state ${state}) from ${Math.round(stoppedAt)} to ${Math.round(resumedAt)} ms; ${answers.length} answers ` +
      `${JSON.stringify(byStatus)}, ${errors.length} errors; admitted: ${before} before the stall, ${during} during it ` +
      `(${answeredDuring} answers during it), ${admitted - before - during} after`,
  )
  t.equal(state, 'T', 'the primary was stopped')
  t.ok(answers.length > 50, `load beyond the limit (${answers.length} answered)`)
  t.ok(admitted <= 50, `nothing beyond the limit: ${admitted} admitted of 50`)
  const metrics = await admin(proxy, '/metrics')
  t.comment(`fallbacks counted: ${sumMetric(metrics.text, 'meliproxy_limiter_fallbacks_total')}`)
})

t.test('a give-back delivered twice (same holder and sequence) is counted once, also when re-sent after a dropped connection', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  // The limiter's own client never re-sends (autoResendUnfulfilledCommands: false in src/worker.ts); this one keeps
  // ioredis's default re-send, so the give-back itself must be what makes a second delivery harmless.
  const relay = await startRelay(redis.port)
  const client = new Redis({ port: relay.port, host: '127.0.0.1', maxRetriesPerRequest: 1, retryStrategy: () => 50 })
  client.on('error', () => {})
  t.teardown(async () => {
    client.disconnect()
    await relay.close()
  })
  t.ok(await waitFor(() => client.status === 'ready', 15_000), 'connected through the relay')
  const pool = new RedisPool(client, { call() {} })
  const limit = 100
  const req: LeaseRequest = { key: `giveback-${Date.now()}`, limit, windowMs: HOUR, want: 10, need: 1, holders: 1, algorithm: 'fixed', burst: 1 }
  const shape = shapeOf('fixed', limit, HOUR, 1)
  let expected = 0
  /** Tokens the bucket counts as used, read by taking one more (which is then counted too). */
  const used = async (): Promise<number> => {
    const g = await pool.acquire({ ...req, want: 1 })
    expected += g.granted
    return limit - g.remaining
  }

  const first = await pool.acquire(req)
  expected += first.granted
  t.equal(first.granted, 10, 'a block of 10 leased')
  const back: Giveback = { key: req.key, windowStart: first.windowStart, tokens: 4, algorithm: 'fixed', shape, holder: 'exactness-a', seq: 1 }
  pool.release(back)
  pool.release(back)
  expected -= 4
  await sleep(300)
  t.equal(await used(), expected, `the same give-back of 4 sent twice: counted once (${expected} used)`)

  // The answer to a give-back is lost and the connection drops: ioredis re-sends it on the new connection.
  const holder = 'exactness-resend'
  const times = () => relay.sent().split(holder).length - 1
  relay.holdReplies()
  pool.release({ ...back, tokens: 3, holder, seq: 1 })
  expected -= 3
  const arrived = await waitFor(() => times() >= 1, 15_000)
  await sleep(300) // Redis applied it; its answer was dropped
  relay.cut()
  const resent = await waitFor(() => client.status === 'ready' && times() >= 2, 15_000)
  await sleep(300)
  t.ok(arrived, 'the give-back reached Redis')
  t.ok(resent, `the client re-sent it after the dropped connection (sent ${times()} times)`)
  t.equal(await used(), expected, `a give-back of 3 delivered ${times()} times: counted once (${expected} used)`)
})
