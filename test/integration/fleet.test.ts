import { spawn, spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { closeAgents, send } from '../helpers/client.js'
import { alive, childPids, cleanEnv, waitFor } from '../helpers/meliproxy.js'
import { freePort } from '../helpers/ports.js'
import { startUpstream } from '../helpers/upstream.js'

/**
 * `npm run fleet`: Redis (Sentinel, or a 3+3 Redis Cluster with `--redis cluster`), N instances and HAProxy in one
 * command, and nothing left after Ctrl-C.
 */

const FLEET = fileURLToPath(new URL('../../build/tools/fleet.js', import.meta.url))
const has = (c: string): boolean => spawnSync('sh', ['-c', `command -v ${c}`]).status === 0
const hasTools = ['redis-server', 'haproxy'].every(has)
/** Each topology, and how many processes it runs besides the instances' workers and HAProxy. */
const TOPOLOGIES = [
  { redis: 'sentinel', processes: 2 + 3, says: /redis master 127\.0\.0\.1:\d+, replica/ },
  ...(has('redis-cli') ? [{ redis: 'cluster', processes: 6, says: /redis cluster \(3 masters, 3 replicas\)/ }] : []),
]

/** Every process below `pid`, depth first. */
function descendants(pid: number): number[] {
  return childPids(pid).flatMap((c) => [c, ...descendants(c)])
}

if (!hasTools) t.plan(0, 'redis-server or haproxy is not installed (.ci/run installs both)')
else {
  for (const topo of TOPOLOGIES) t.test(`the fleet command with --redis ${topo.redis} starts the topology, serves through HAProxy, and leaves nothing behind after SIGINT`, async (t) => {
    const upstream = await startUpstream()
    upstream.route('/categories', (_req, res) => res.end('through the fleet'))
    t.teardown(async () => {
      await closeAgents()
      await upstream.close()
    })
    const port = await freePort()
    const fleet = spawn('env', ['-u', 'NODE_OPTIONS', process.execPath, FLEET, '--redis', topo.redis, '--instances', '2', '--port', String(port), '--upstream', upstream.url, '--workers', '1'], {
      env: cleanEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let out = ''
    fleet.stdout!.on('data', (c: Buffer) => (out += c))
    fleet.stderr!.on('data', (c: Buffer) => (out += c))
    const exited = new Promise<number | null>((r) => fleet.once('exit', (code) => r(code)))
    // Should an assertion below throw, the fleet still stops everything it started.
    t.teardown(() => {
      if (fleet.exitCode === null && fleet.signalCode === null) fleet.kill('SIGINT')
    })
    // Redis, two instances and HAProxy start: a generous deadline for a busy machine (none once the fleet has exited).
    await waitFor(() => out.includes('meliproxy fleet ready') || fleet.exitCode !== null || fleet.signalCode !== null, 90_000)
    t.ok(out.includes('meliproxy fleet ready'), `the fleet says it is ready:\n${out}`)
    t.match(out, /instance 2: proxy http:\/\/127\.0\.0\.1:\d+, admin and dashboard/, 'it prints where each instance listens')
    t.match(out, /dashboard: http:\/\/127\.0\.0\.1:\d+\//, 'and the dashboard')
    t.match(out, topo.says, 'and the Redis topology')
    const adminPort = /admin and dashboard http:\/\/127\.0\.0\.1:(\d+)/.exec(out)![1]
    const status = await send(`http://127.0.0.1:${adminPort}/api/status`)
    t.equal(JSON.parse(status.body).redis.mode, topo.redis, `the instances use Redis ${topo.redis}`)
    const got = await send(`http://127.0.0.1:${port}/categories/MLA1`)
    t.equal(got.status, 200, 'a request through HAProxy is served')
    t.equal(got.body, 'through the fleet')

    const started = descendants(fleet.pid!)
    t.ok(started.length >= topo.processes + 2 + 1, `${started.length} processes started (redis, instances and their workers, haproxy)`)
    fleet.kill('SIGINT')
    const code = await Promise.race([exited, new Promise<string>((r) => setTimeout(() => r('timeout'), 30_000).unref())])
    t.equal(code, 0, 'it exits 0 after stopping everything')
    t.ok(await waitFor(() => started.every((p) => !alive(p)), 20_000), 'no process it started is left running')
    for (const p of started) if (alive(p)) process.kill(p, 'SIGKILL')
  })

  t.test('the fleet command says plainly what is wrong with a bad flag', async (t) => {
    const r = spawnSync('env', ['-u', 'NODE_OPTIONS', process.execPath, FLEET, '--instances', 'zero'], { encoding: 'utf8' })
    t.equal(r.status, 2)
    t.match(r.stderr, /^meliproxy fleet: --instances: "zero" is not a whole number from 1 to 64\n$/)
    const topology = spawnSync('env', ['-u', 'NODE_OPTIONS', process.execPath, FLEET, '--redis', 'standalone'], { encoding: 'utf8' })
    t.equal(topology.status, 2)
    t.match(topology.stderr, /^meliproxy fleet: --redis: "standalone" is not one of sentinel, cluster\n$/)
  })
}
