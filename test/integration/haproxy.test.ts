import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { readFileSync, writeFileSync, mkdtempSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { closeAgents, send } from '../helpers/client.js'
import { steadyLoad } from '../helpers/load.js'
import { admin, startMeliproxy, startTogether, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { freePort } from '../helpers/ports.js'
import { startSentinels, type SentinelTopology } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * The fleet on one machine: config/haproxy.cfg (ports rewritten to free ones) in front of two meliproxy instances
 * sharing Redis Sentinel. One instance is killed under load: the health check moves traffic to the other, limits
 * stay exact and the cache stays shared. Then Redis fails over and dies entirely under load: no instance leaves the
 * rotation and no request is lost. Runs where haproxy is installed (.ci/run installs it).
 */

const hasHaproxy = spawnSync('sh', ['-c', 'command -v haproxy']).status === 0
if (hasHaproxy) register()
else t.plan(0, 'haproxy is not installed (apt-get install haproxy, as .ci/run does)')

function register(): void {
  let upstream: TestUpstream
  let topo: SentinelTopology
  let a: RunningProxy
  let b: RunningProxy
  let haproxy: ChildProcess
  let lb: string
  let config: string
  let statsSocket: string

  /**
   * HAProxy's own view of the backend's servers, by name (a, b): UP, DOWN, or a state on the way ("UP 1/2"), from
   * `show stat` on its stats socket (the test adds one to the config). Empty when the socket does not answer.
   */
  async function servers(): Promise<Record<string, string>> {
    const csv = await new Promise<string>((resolve) => {
      const s = connect(statsSocket)
      let out = ''
      s.on('data', (c: Buffer) => (out += c.toString()))
      s.on('error', () => resolve(''))
      s.on('close', () => resolve(out))
      s.end('show stat\n')
    })
    const [header, ...rows] = csv.trim().split('\n')
    const columns = (header ?? '').replace(/^# /, '').split(',')
    const status = columns.indexOf('status')
    const out: Record<string, string> = {}
    for (const row of rows) {
      const cells = row.split(',')
      if (cells[0] === 'meliproxy' && (cells[1] === 'a' || cells[1] === 'b')) out[cells[1]] = cells[status] ?? ''
    }
    return out
  }
  /** Waits until HAProxy reports server `name` as `state` (UP, or DOWN whatever its count); what it reports last. */
  async function serverState(name: 'a' | 'b', state: 'UP' | 'DOWN', ms: number): Promise<{ ok: boolean; seen: string }> {
    let seen = ''
    const ok = await waitFor(async () => {
      seen = (await servers())[name] ?? ''
      return state === 'UP' ? seen === 'UP' : seen.startsWith('DOWN')
    }, ms)
    return { ok, seen }
  }

  t.before(async () => {
    upstream = await startUpstream()
    upstream.route('/cat', (_req, res) => {
      res.writeHead(200, { 'cache-control': 'max-age=600' })
      res.end('category')
    })
    upstream.route('/lim', (_req, res) => res.end('ok'))
    upstream.route('/load', (_req, res) => res.end('ok'))
    topo = await startSentinels()
    config = writeConfig({
      upstream: upstream.url,
      accessLog: false,
      redisSentinels: topo.sentinelList,
      trustProxy: '127.0.0.1/32',
      shutdownDelay: '2s', // longer than HAProxy needs to see /readyz fail (inter 500ms, fall 2)
      limits: [{ name: 'per-client', match: { path: '/lim/*' }, per: ['ip'], limit: 30, window: '1h' }],
    })
    ;[a, b] = await startTogether([['--config', config], ['--config', config]])
    const front = await freePort()
    const cfg = readFileSync(new URL('../../config/haproxy.cfg', import.meta.url), 'utf8')
      .replace('127.0.0.1:8080', `127.0.0.1:${front}`)
      .replace('127.0.0.1:8081 check port 9091', `127.0.0.1:${a.port} check port ${a.adminPort}`)
      .replace('127.0.0.1:8082 check port 9092', `127.0.0.1:${b.port} check port ${b.adminPort}`)
    const dir = mkdtempSync(join(tmpdir(), 'meliproxy-haproxy-'))
    // A stats socket, for the test to see when HAProxy takes a server out of the rotation or back (not in the shipped file).
    statsSocket = join(dir, 'stats.sock')
    writeFileSync(join(dir, 'haproxy.cfg'), cfg.replace('global\n', `global\n    stats socket ${statsSocket}\n`))
    haproxy = spawn('haproxy', ['-db', '-f', join(dir, 'haproxy.cfg')], { stdio: ['ignore', 'ignore', 'pipe'] })
    let haproxyLog = ''
    haproxy.stderr!.on('data', (c: Buffer) => (haproxyLog += c))
    lb = `http://127.0.0.1:${front}`
    if (!(await waitFor(async () => (await send(`${lb}/load/up`).catch(() => ({ status: 0 }))).status === 200, 30_000))) {
      throw new Error(`haproxy did not come up: ${haproxyLog}`)
    }
    for (const name of ['a', 'b'] as const) {
      const up = await serverState(name, 'UP', 30_000)
      if (!up.ok) throw new Error(`haproxy did not put instance ${name} in the rotation (${up.seen}): ${haproxyLog}`)
    }
  })
  t.teardown(async () => {
    haproxy?.kill('SIGKILL')
    await Promise.all([a?.stop(), b?.stop()])
    await topo?.stop()
    await closeAgents()
    await upstream?.close()
  })

  t.test('one instance killed under load: traffic moves, limits stay exact, the cache stays shared', async (t) => {
    // Before: both instances serve through the LB; limits count across them, the cache is filled once.
    const before: number[] = []
    for (let i = 0; i < 20; i++) before.push((await send(`${lb}/lim/x${i}`, { from: '127.0.0.41' })).status)
    t.same(new Set(before), new Set([200]), '20 of the 30 allowed, spread over both instances')
    t.equal((await send(`${lb}/cat/1`)).status, 200)
    for (let i = 0; i < 4; i++) t.equal((await send(`${lb}/cat/1`)).headers['x-cache'], 'HIT', 'served from the shared cache')

    let stop!: () => void
    const until = new Promise<void>((r) => (stop = r))
    const load = steadyLoad({ url: `${lb}/load/steady`, concurrency: 6, maxRequests: 400_000, maxMs: 60_000, until })
    await new Promise((r) => setTimeout(r, 800))
    const killed = [a.proc.pid!, ...a.workerPids()]
    const killedAt = Date.now()
    for (const pid of killed) process.kill(pid, 'SIGKILL')
    await new Promise((r) => setTimeout(r, 3_000)) // several health-check intervals under load
    // HAProxy's checks take it out (about a second; later on a busy machine): the load goes on until they have.
    const down = await serverState('a', 'DOWN', 30_000)
    t.ok(down.ok, `HAProxy took the killed instance out of the rotation (${down.seen}, ${Date.now() - killedAt} ms after the kill)`)
    stop()
    const result = await load
    const failed = result.errors.length + Object.entries(result.byStatus).filter(([s]) => Number(s) >= 500).reduce((n, [, c]) => n + c, 0)
    // HAProxy retries a GET that got no response on the other instance (retry-on empty-response): at most the ones
    // in flight could fail, and in practice none does.
    t.ok(failed <= 6, `${failed} of ${result.sent} requests failed (at most those in flight on the killed instance)`)
    t.comment(`haproxy failover: ${failed} failed of ${result.sent} while one of two instances was SIGKILLed`)

    // After: only B is left; every request succeeds, the limit is still exact, the cache still shared.
    const steady = await steadyLoad({ url: `${lb}/load/after`, concurrency: 4, maxRequests: 200, maxMs: 10_000 })
    t.same(steady.byStatus, { 200: 200 }, `every request answered by the surviving instance ${JSON.stringify(steady.errors.slice(0, 3))}`)
    const after: number[] = []
    for (let i = 0; i < 15; i++) after.push((await send(`${lb}/lim/y${i}`, { from: '127.0.0.41' })).status)
    t.same(after, [...Array(10).fill(200), ...Array(5).fill(429)], 'exactly 30 in all for the client, across both instances')
    const hit = await send(`${lb}/cat/1`)
    t.equal(hit.headers['x-cache'], 'HIT')
    t.equal(upstream.hits('/cat/1'), 1, 'the upstream was asked once for the whole fleet')
  })

  t.test('a rolling restart of the fleet behind HAProxy under load: zero failed requests', async (t) => {
    // A was killed above: it comes back on its ports first.
    a = await startMeliproxy(['--config', config], { port: a.port, adminPort: a.adminPort })
    // HAProxy's check brings it back (rise 1, inter 500 ms; later on a busy machine).
    const back = await serverState('a', 'UP', 30_000)
    t.ok(back.ok, `HAProxy put the restarted instance back (${back.seen})`)
    let stop!: () => void
    const until = new Promise<void>((r) => (stop = r))
    const load = steadyLoad({ url: `${lb}/load/rolling`, concurrency: 6, maxRequests: 400_000, maxMs: 120_000, until })
    for (const name of ['a', 'b'] as const) {
      const old = name === 'a' ? a : b
      await old.stop() // SIGTERM: /readyz turns 503, the port closes, in-flight requests finish
      const fresh = await startMeliproxy(['--config', config], { port: old.port, adminPort: old.adminPort })
      if (name === 'a') a = fresh
      else b = fresh
      // The next one stops only once HAProxy sends to this one again (a fixed wait could end before its check did).
      const up = await serverState(name, 'UP', 30_000)
      t.ok(up.ok, `HAProxy put the new ${name} in the rotation (${up.seen})`)
    }
    stop()
    const result = await load
    t.same(result.errors, [], `no request failed of ${result.sent}`)
    t.same(Object.keys(result.byStatus), ['200'], `every request answered 200: ${JSON.stringify(result.byStatus)}`)
    t.comment(`rolling restart behind HAProxy: ${result.sent} requests, ${result.errors.length} failed`)
  })

  t.test('Redis fails over, then dies entirely, under load behind HAProxy: no instance leaves the rotation, no request is lost', async (t) => {
    let stop!: () => void
    const until = new Promise<void>((r) => (stop = r))
    let n = 0
    const url = (): string => (n++ % 2 === 0 ? `${lb}/cat/1` : `${lb}/load/redis-${n % 50}`)
    const load = steadyLoad({ url, concurrency: 6, maxRequests: 400_000, maxMs: 150_000, until })
    await new Promise((r) => setTimeout(r, 500))
    const oldMaster = topo.master.port
    topo.master.signal('SIGKILL')
    // A sentinel starved of CPU for 2 s enters TILT and acts on nothing for 30 s: the deadline allows TILT plus a failover.
    t.ok(await waitFor(async () => (await topo.currentMasterPort()) !== oldMaster, 45_000), 'the replica was promoted')
    await new Promise((r) => setTimeout(r, 1_000))
    topo.replica.signal('SIGKILL') // no Redis left at all
    const readiness = await waitFor(async () => {
      const both = await Promise.all([admin(a, '/readyz'), admin(b, '/readyz')])
      return both.every((r) => r.status === 200 && r.body.redis === 'unreachable')
    }, 30_000)
    t.ok(readiness, 'both instances stay ready and report Redis unreachable in /readyz')
    await new Promise((r) => setTimeout(r, 3_000)) // several health-check intervals with Redis gone
    stop()
    const result = await load
    const failed = result.errors.length + Object.entries(result.byStatus).filter(([s]) => Number(s) >= 500).reduce((m, [, c]) => m + c, 0)
    t.equal(failed, 0, `no request failed of ${result.sent}: ${JSON.stringify(result.byStatus)} ${result.errors.slice(0, 3)}`)
    t.comment(`redis failover then outage behind HAProxy: ${result.sent} requests, ${failed} failed`)
  })
}
