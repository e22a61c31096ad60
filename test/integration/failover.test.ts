import t from 'tap'
import { closeAgents } from '../helpers/client.js'
import { steadyLoad } from '../helpers/load.js'
import { admin, startMeliproxy, waitFor, writeConfig } from '../helpers/meliproxy.js'
import { startRedis, startSentinels } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * Redis Sentinel failovers under a steady mix of cache hits, misses and limited requests through two workers:
 * the master SIGKILLed, then the next master frozen (SIGSTOP) and resumed. No 5xx, and the frozen master, once
 * resumed, gets no writes from meliproxy (ioredis' failoverDetector moved every client to the new master).
 */

/**
 * How long a failover may take on a busy machine. A sentinel whose timer is starved for 2 s enters TILT mode and
 * acts on nothing for 30 s; with two test files on two cores that happens, so each wait allows TILT plus a failover.
 */
const FAILOVER_DEADLINE_MS = 45_000

let upstream: TestUpstream
t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/cat', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=600' })
    res.end('category')
  })
  upstream.route('/miss', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'no-store' })
    res.end('fresh')
  })
  upstream.route('/lim', (_req, res) => res.end('limited path'))
})
t.teardown(async () => {
  await closeAgents()
  await upstream?.close()
})

t.test('SIGKILL the master, then SIGSTOP the next one, under load: no 5xx, no write to a demoted master', async (t) => {
  const topo = await startSentinels()
  t.teardown(() => topo.stop())
  const proxy = await startMeliproxy([
    '--redis-sentinels', topo.sentinelList,
    '--config', writeConfig({ upstream: upstream.url, accessLog: false, limits: [{ name: 'lim', match: { path: '/lim/*' }, limit: 20, window: '1h' }] }),
  ])
  t.teardown(() => proxy.stop())

  let n = 0
  const url = (): string => {
    const i = n++
    if (i % 3 === 0) return `${proxy.url}/cat/${i % 5}` // hits after the first of each
    if (i % 3 === 1) return `${proxy.url}/miss/${i}`
    return `${proxy.url}/lim/${i}` // 429 once 20 were admitted
  }
  let stop!: () => void
  const until = new Promise<void>((r) => (stop = r))
  const load = steadyLoad({ url, concurrency: 6, maxRequests: 1_000_000, maxMs: 240_000, until })
  const redisUsed = async (masterPort: number): Promise<boolean> => {
    const s = (await admin(proxy, '/api/status')).body
    return s.redis.state === 'ready' && s.redis.role === 'master' && (await topo.currentMasterPort()) === masterPort
  }

  // 1. The master dies.
  await new Promise((r) => setTimeout(r, 500))
  const killedAt = Date.now()
  topo.master.signal('SIGKILL')
  t.ok(await waitFor(async () => (await topo.currentMasterPort()) === topo.replica.port, FAILOVER_DEADLINE_MS), 'the replica was promoted')
  t.ok(await waitFor(() => redisUsed(topo.replica.port), FAILOVER_DEADLINE_MS), 'meliproxy uses the new master')
  const afterKillMs = Date.now() - killedAt

  // 2. A new replica for the next failover, then the new master hangs.
  const third = await startRedis(topo.replica.port)
  t.teardown(() => third.stop())
  const sentinel = topo.sentinels[0]!.client()
  t.ok(
    await waitFor(async () => {
      const replicas = (await sentinel.call('SENTINEL', 'replicas', 'mymaster')) as string[][]
      return replicas.some((r) => r[r.indexOf('port') + 1] === String(third.port) && !r[r.indexOf('flags') + 1]!.includes('down'))
    }, 20_000),
    'the sentinels know the new replica',
  )
  const frozenAt = Date.now()
  topo.replica.signal('SIGSTOP')
  try {
    t.ok(await waitFor(async () => (await topo.currentMasterPort()) === third.port, FAILOVER_DEADLINE_MS), 'the third one was promoted')
    t.ok(await waitFor(() => redisUsed(third.port), FAILOVER_DEADLINE_MS), 'meliproxy uses it')
  } finally {
    topo.replica.signal('SIGCONT')
  }
  const afterFreezeMs = Date.now() - frozenAt

  // 3. The frozen master is back. A write can only be acknowledged over a connection; the connections meliproxy
  // had before the freeze were dropped by its clients (failoverDetector), so any meliproxy connection opened to it
  // after it resumed, while it still believes it is a master, would be split-brain. There must be none.
  const old = topo.replica.client()
  const resumedAt = Date.now()
  const fresh: string[] = []
  let demoted = false
  while (Date.now() - resumedAt < FAILOVER_DEADLINE_MS) {
    const list = ((await old.call('CLIENT', 'LIST')) as string).split('\n').filter((l) => /name=meliproxy-/.test(l))
    const sinceResume = (Date.now() - resumedAt) / 1000
    for (const line of list) {
      const age = Number(/ age=(\d+)/.exec(line)?.[1] ?? 0)
      // Connections from before the freeze are older than the freeze (about 3 s) plus the time since the resume.
      if (age <= sinceResume + 1 && !fresh.includes(line)) fresh.push(line)
    }
    if (/role:slave/.test(await old.info('replication'))) {
      demoted = true
      break
    }
    await new Promise((r) => setTimeout(r, 50))
  }
  t.ok(demoted, 'the sentinels demoted the resumed master')
  t.same(fresh, [], 'meliproxy opened no connection to it while it could take writes')
  t.ok(
    // It notices the connections its clients dropped once it runs again: later on a busy machine.
    await waitFor(async () => !/name=meliproxy-/.test((await old.call('CLIENT', 'LIST')) as string), 20_000),
    'and holds none to it now',
  )

  await new Promise((r) => setTimeout(r, 1_000))
  stop()
  const result = await load
  const fivexx = Object.entries(result.byStatus).filter(([s]) => Number(s) >= 500)
  t.same(result.errors, [], 'no request failed')
  t.same(fivexx, [], 'no 5xx')
  t.ok((result.byStatus[200] ?? 0) > 100 && (result.byStatus[429] ?? 0) > 0, `hits, misses and limited ones were sent: ${JSON.stringify(result.byStatus)}`)
  t.comment(`failover under load: ${result.sent} requests; Redis used again ${afterKillMs} ms after SIGKILL of the master, ${afterFreezeMs} ms after SIGSTOP of the next`)
})
