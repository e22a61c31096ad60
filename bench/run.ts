import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Agent, request } from 'undici'
import { clusterMasters, redisCli, startLocalCluster } from '../tools/redis-cluster.js'
import { buckets } from './buckets.js'
import { soak } from './soak.js'
import { args, flag } from './args.js'
import { freePort } from './ports.js'

/**
 * `npm run bench`: self-contained on loopback. Starts a mock upstream, two baselines and meliproxy, loads each for
 * a fixed time with one load generator (wrk when installed, else autocannon), and prints req/s, p50/p99 latency and
 * errors with meliproxy's ratios to the baselines. Options: --duration S (default 5), --connections N (default 64),
 * --workers N (default 2), --rounds N (default 5). `--soak` instead runs the memory soak (bench/soak.ts): --duration S
 * (default 60), --urls N (100000), --l1-mb N (64). --only REGEX runs only the scenarios whose name matches (e.g.
 * `--only 'bare node|cache hit \(L1(, no log)?\)'`: the access log's cost on cache hits). `--buckets` instead runs the
 * per-client buckets bench (bench/buckets.ts), embedded and with Redis: --bucket-clients N (default 1000000),
 * --duration S (longest load per mode, default 180), --idle S (default 70), --bucket-modes embedded,redis (default
 * both), --no-stats (meliproxy's usage statistics off).
 */

interface Figures {
  name: string
  rps: number
  p50: number
  p99: number
  errors: number
}

const DURATION = flag('--duration', 5)
const CONNECTIONS = flag('--connections', 64)
const WORKERS = flag('--workers', 2)
const ROUNDS = flag('--rounds', 5)
const ONLY = args.includes('--only') ? new RegExp(args[args.indexOf('--only') + 1]!) : null

const here = (p: string): string => fileURLToPath(new URL(p, import.meta.url))
const SERVERS = here('./servers.js')
const BIN = here('../../bin/meliproxy')
const AUTOCANNON = here('../../node_modules/autocannon/autocannon.js')
const started: ChildProcess[] = []

function launch(cmd: string, argv: string[]): ChildProcess {
  const p = spawn(cmd, argv, { stdio: ['ignore', 'ignore', 'inherit'] })
  started.push(p)
  return p
}

async function waitUp(url: string): Promise<void> {
  const deadline = Date.now() + 60_000
  while (Date.now() < deadline) {
    try {
      const r = await fetch(url)
      await r.arrayBuffer()
      if (r.status === 200) return
    } catch {
      // not yet
    }
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error(`${url} did not come up`)
}

const hasWrk = spawnSync('sh', ['-c', 'command -v wrk']).status === 0

function parseWrkLatency(text: string, pct: string): number {
  const m = new RegExp(`^\\s*${pct}%\\s+([\\d.]+)(us|ms|s)`, 'm').exec(text)
  if (!m) return NaN
  const v = Number(m[1])
  return m[2] === 'us' ? v / 1000 : m[2] === 's' ? v * 1000 : v
}

function load(name: string, url: string, seconds: number): Figures {
  if (hasWrk) {
    const r = spawnSync('wrk', ['-t1', `-c${CONNECTIONS}`, `-d${seconds}s`, '--latency', url], { encoding: 'utf8' })
    const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(r.stdout)?.[1] ?? 0)
    const non2xx = Number(/Non-2xx or 3xx responses:\s+(\d+)/.exec(r.stdout)?.[1] ?? 0)
    const sockErr = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(r.stdout)
    const errors = non2xx + (sockErr ? sockErr.slice(1).reduce((a, b) => a + Number(b), 0) : 0)
    return { name, rps, p50: parseWrkLatency(r.stdout, '50'), p99: parseWrkLatency(r.stdout, '99'), errors }
  }
  const r = spawnSync(process.execPath, [AUTOCANNON, '-c', String(CONNECTIONS), '-d', String(seconds), '-j', url], {
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  })
  const j = JSON.parse(r.stdout) as {
    requests: { average: number }
    latency: { p50: number; p99: number }
    errors: number
    timeouts: number
    non2xx: number
  }
  return { name, rps: j.requests.average, p50: j.latency.p50, p99: j.latency.p99, errors: j.errors + j.timeouts + j.non2xx }
}

/**
 * The example rules from the README plus a per-client rule, with limits high enough that the bench never exhausts
 * them: the scenario measures the cost of checking every request, not of answering 429s.
 */
const BENCH_LIMITS = [
  { name: 'ip-152', match: { ip: '152.152.152.152' }, limit: 1000, window: '1m' },
  { name: 'categories', match: { path: '/categories/*' }, limit: 100_000_000, window: '1m' },
  { name: 'ip-152-items', match: { ip: '152.152.152.152', path: '/items/*' }, limit: 10, window: '1m' },
  { name: 'per-client', per: ['ip'], limit: 100_000_000, window: '1m' },
]

/** One per-client rule of each algorithm, at limits the bench never reaches: what each algorithm costs per request. */
const ALGORITHMS = ['fixed', 'sliding', 'token-bucket'] as const
const algorithmRule = (algorithm: string) => [{ name: algorithm, per: ['ip'], algorithm, limit: 100_000_000, window: '1m' }]

async function startMeliproxy(upstream: string, extra: string[]): Promise<string> {
  const [port, admin] = await Promise.all([freePort(), freePort()])
  launch(process.execPath, [
    BIN, '--port', String(port), '--host', '127.0.0.1', '--admin-port', String(admin),
    '--workers', String(WORKERS), '--upstream', upstream, '--log-level', 'warn', ...extra,
  ])
  return `http://127.0.0.1:${port}`
}

async function main(): Promise<void> {
  const [upPort, barePort, undiciPort, redisPort] = await Promise.all([freePort(), freePort(), freePort(), freePort()])
  const upstream = `http://127.0.0.1:${upPort}`
  launch(process.execPath, [SERVERS, 'upstream', String(upPort)])
  launch(process.execPath, [SERVERS, 'bare', String(barePort), String(WORKERS)])
  launch(process.execPath, [SERVERS, 'undici-proxy', String(undiciPort), String(WORKERS), upstream])
  const dir = mkdtempSync(join(tmpdir(), 'meliproxy-bench-'))
  const hasRedis = spawnSync('sh', ['-c', 'command -v redis-server']).status === 0
  if (hasRedis) {
    launch('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir])
  }
  const limitsConfig = join(dir, 'limits.json')
  writeFileSync(limitsConfig, JSON.stringify({ redisUrl: `redis://127.0.0.1:${redisPort}`, limits: BENCH_LIMITS }))
  for (const algorithm of ALGORITHMS) {
    writeFileSync(join(dir, `${algorithm}.json`), JSON.stringify({ redisUrl: `redis://127.0.0.1:${redisPort}`, limits: algorithmRule(algorithm) }))
  }
  const noLimitsConfig = join(dir, 'no-limits.json')
  writeFileSync(noLimitsConfig, JSON.stringify({ redisUrl: `redis://127.0.0.1:${redisPort}` }))
  // The same shared tier on a local Redis Cluster (3 masters + 3 replicas), when redis-cli can create one.
  const hasCluster = hasRedis && spawnSync('sh', ['-c', 'command -v redis-cli']).status === 0
  const wantCluster = hasCluster && (ONLY === null || CLUSTER_SCENARIOS.some((name) => ONLY.test(name)))
  const clusterPorts = wantCluster ? await startLocalCluster(dir, (_name, a) => launch('redis-server', a), freePort) : []
  const seeds = clusterPorts.map((p) => `127.0.0.1:${p}`).join(',')
  const clusterLimitsConfig = join(dir, 'cluster-limits.json')
  writeFileSync(clusterLimitsConfig, JSON.stringify({ redisCluster: seeds, limits: BENCH_LIMITS }))

  const path = '/categories/MLA97994'
  const redisUrl = `redis://127.0.0.1:${redisPort}`
  const targets = {
    bare: `http://127.0.0.1:${barePort}${path}`,
    undici: `http://127.0.0.1:${undiciPort}${path}`,
    meliproxy: (await startMeliproxy(upstream, ['--no-cache'])) + path,
    limits: hasRedis ? (await startMeliproxy(upstream, ['--no-cache', '--config', limitsConfig])) + path : null,
    cacheL1: (await startMeliproxy(upstream, [])) + path,
    cacheL1Quiet: (await startMeliproxy(upstream, ['--no-access-log'])) + path,
    cacheL1NoStats: (await startMeliproxy(upstream, ['--no-stats'])) + path,
    // Limits on cache hits, where their cost shows, against the same proxy with the same Redis and no rules.
    cacheL1Redis: hasRedis ? (await startMeliproxy(upstream, ['--config', noLimitsConfig])) + path : null,
    cacheL1Limits: hasRedis ? (await startMeliproxy(upstream, ['--config', limitsConfig])) + path : null,
    cacheL1Fixed: hasRedis ? (await startMeliproxy(upstream, ['--config', join(dir, 'fixed.json')])) + path : null,
    cacheL1Sliding: hasRedis ? (await startMeliproxy(upstream, ['--config', join(dir, 'sliding.json')])) + path : null,
    cacheL1Bucket: hasRedis ? (await startMeliproxy(upstream, ['--config', join(dir, 'token-bucket.json')])) + path : null,
    cacheL2: hasRedis ? (await startMeliproxy(upstream, ['--redis-url', redisUrl, '--cache-l1-size', '0'])) + path : null,
    clusterL2: wantCluster ? (await startMeliproxy(upstream, ['--redis-cluster', seeds, '--cache-l1-size', '0'])) + path : null,
    clusterL1Limits: wantCluster ? (await startMeliproxy(upstream, ['--config', clusterLimitsConfig])) + path : null,
  }
  for (const url of Object.values(targets)) if (url !== null) await waitUp(url)

  const generator = hasWrk ? 'wrk -t1' : 'autocannon'
  console.log(
    `meliproxy bench: ${generator}, ${CONNECTIONS} connections, ${ROUNDS} rounds of ${DURATION}s each, ${WORKERS} workers per server`,
  )
  // Each target is a ratio to a baseline measured next to it in the same round: on a shared VM the machine's
  // speed drifts over minutes, so adjacent measurements compare like with like. A ratio is reported as the median of
  // its per-round ratios, with the range.
  const scenarios: [string, string | null][] = [
    ['bare node (memory)', targets.bare],
    ['meliproxy cache hit (L1)', targets.cacheL1],
    ['meliproxy cache hit (L1, no stats)', targets.cacheL1NoStats],
    ['meliproxy cache hit (L1, no log)', targets.cacheL1Quiet],
    ['meliproxy cache hit (L2, L1 off)', targets.cacheL2],
    ['cluster cache hit (L2, L1 off)', targets.clusterL2],
    ['meliproxy cache hit (L1, Redis)', targets.cacheL1Redis],
    ['meliproxy cache hit + 4 limit rules', targets.cacheL1Limits],
    ['cluster cache hit + 4 limit rules', targets.clusterL1Limits],
    ['cache hit + 1 fixed rule', targets.cacheL1Fixed],
    ['cache hit + 1 sliding rule', targets.cacheL1Sliding],
    ['cache hit + 1 token-bucket rule', targets.cacheL1Bucket],
    ['bare undici proxy', targets.undici],
    ['meliproxy proxy (access log on)', targets.meliproxy],
    ['meliproxy + 4 limit rules (Redis)', targets.limits],
  ]
  if (!hasRedis) console.log('redis-server not found: the Redis scenarios are skipped')
  else if (!hasCluster) console.log('redis-cli not found: the Redis Cluster scenarios are skipped')
  const active = scenarios.filter((s): s is [string, string] => s[1] !== null && (ONLY === null || ONLY.test(s[0])))
  for (const [name, url] of active) load(name, url, 2) // warm-up: JIT, keep-alive pools
  const runs = new Map<string, Figures[]>(active.map(([name]) => [name, []]))
  // The limiter's Redis work: every script it runs is an EVALSHA (the statistics use MULTI/EXEC, not scripts).
  const evalshaCalls = (): number => {
    if (!hasRedis) return 0
    const out = spawnSync('redis-cli', ['-p', String(redisPort), 'info', 'commandstats'], { encoding: 'utf8' }).stdout ?? ''
    return Number(/cmdstat_evalsha:calls=(\d+)/.exec(out)?.[1] ?? 0)
  }
  let limitScripts = 0
  let limitRequests = 0
  // What each cluster master ran during the measured rounds (INFO commandstats), and the keys it holds.
  const masters = clusterMasters(clusterPorts)
  for (const p of masters) redisCli(['-p', String(p), 'config', 'resetstat'])
  for (let round = 0; round < ROUNDS; round++) {
    // Every other round runs in reverse order, so no scenario always follows the same neighbour.
    const order = round % 2 === 0 ? active : [...active].reverse()
    for (const [name, url] of order) {
      const counted = name.includes('limit rules') && !name.startsWith('cluster')
      const before = counted ? evalshaCalls() : 0
      const figures = load(name, url, DURATION)
      runs.get(name)!.push(figures)
      if (counted) {
        limitScripts += evalshaCalls() - before
        limitRequests += figures.rps * DURATION
      }
    }
  }
  const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length
  console.log('\nscenario                          req/s     p50 ms   p99 ms   errors')
  for (const [name, r] of runs) {
    console.log(
      `${name.padEnd(32)} ${mean(r.map((x) => x.rps)).toFixed(0).padStart(7)} ${mean(r.map((x) => x.p50)).toFixed(2).padStart(9)} ` +
        `${mean(r.map((x) => x.p99)).toFixed(2).padStart(8)} ${String(r.reduce((a, x) => a + x.errors, 0)).padStart(8)}`,
    )
  }
  console.log('')
  const ratio = (label: string, name: string, base: string, target: string): void => {
    const a = runs.get(name)
    const b = runs.get(base)
    if (a === undefined || b === undefined) return
    const each = a.map((x, i) => x.rps / b[i]!.rps).sort((p, q) => p - q)
    const mid = each.length % 2 === 1 ? each[(each.length - 1) / 2]! : (each[each.length / 2 - 1]! + each[each.length / 2]!) / 2
    console.log(
      `${label}: ${mid.toFixed(2)}x median of ${each.length} rounds (${each[0]!.toFixed(2)}-${each[each.length - 1]!.toFixed(2)})${target}`,
    )
  }
  ratio('meliproxy proxy / bare undici proxy', 'meliproxy proxy (access log on)', 'bare undici proxy', ' (target >= 1.0x)')
  ratio('meliproxy with limits / without', 'meliproxy + 4 limit rules (Redis)', 'meliproxy proxy (access log on)', ' (target >= 0.7x)')
  ratio('limits on cache hits / same proxy without', 'meliproxy cache hit + 4 limit rules', 'meliproxy cache hit (L1, Redis)', ' (target >= 0.9x)')
  for (const algorithm of ALGORITHMS) {
    ratio(`${algorithm} rule on cache hits / same proxy without`, `cache hit + 1 ${algorithm} rule`, 'meliproxy cache hit (L1, Redis)', '')
  }
  if (limitRequests > 0) {
    console.log(
      `limiter Redis scripts per request (both limit scenarios): ${(limitScripts / limitRequests).toFixed(5)} ` +
        `(${limitScripts} scripts, each 3-4 commands inside, for about ${Math.round(limitRequests)} requests)`,
    )
  }
  ratio('meliproxy cache hit (L1) / bare node (memory)', 'meliproxy cache hit (L1)', 'bare node (memory)', ' (target >= 0.85x)')
  ratio('statistics on / off (cache hit, L1)', 'meliproxy cache hit (L1)', 'meliproxy cache hit (L1, no stats)', ' (target >= 0.95x)')
  ratio('access log on / off (cache hit, L1)', 'meliproxy cache hit (L1)', 'meliproxy cache hit (L1, no log)', '')
  ratio('meliproxy cache hit (L1, no access log) / bare node', 'meliproxy cache hit (L1, no log)', 'bare node (memory)', '')
  ratio('meliproxy cache hit (L2, L1 off) / bare node', 'meliproxy cache hit (L2, L1 off)', 'bare node (memory)', '')
  ratio('Redis Cluster / one Redis: cache hit (L2, L1 off)', 'cluster cache hit (L2, L1 off)', 'meliproxy cache hit (L2, L1 off)', '')
  ratio('Redis Cluster / one Redis: cache hit + 4 limit rules', 'cluster cache hit + 4 limit rules', 'meliproxy cache hit + 4 limit rules', '')
  if (masters.length > 0) {
    printSpread(masters, 'the measured rounds of the cluster scenarios: one URL, one client')
    // Then many keys: 1,000 URLs three times each through the L2-only instance (a miss, then two L2 hits).
    for (const p of masters) redisCli(['-p', String(p), 'config', 'resetstat'])
    const base = targets.clusterL2!.slice(0, -path.length)
    let next = 0
    const statuses = new Map<string, number>()
    // Connections of their own: the redis-cli calls above block this event loop (spawnSync) for longer than the
    // proxy's 5 s keep-alive, so a pooled socket could be handed out after the proxy closed it ("other side closed").
    const agent = new Agent({ connections: 16 })
    const lane = async (): Promise<void> => {
      while (next < 3_000) {
        const i = next++
        let outcome: string
        try {
          const r = await request(`${base}/categories/MLA${i % 1_000}`, { dispatcher: agent })
          await r.body.dump()
          outcome = `${r.statusCode} ${String(r.headers['x-cache'] ?? '')}`.trim()
        } catch (err) {
          outcome = String(err)
        }
        statuses.set(outcome, (statuses.get(outcome) ?? 0) + 1)
      }
    }
    await Promise.all(Array.from({ length: 16 }, lane))
    await agent.close()
    printSpread(masters, `1,000 URLs x 3 through L2 (${[...statuses].map(([k, n]) => `${k}: ${n}`).join(', ')}), then every key held`)
  }
}

/** The cluster scenarios (started only when --only selects one of them). */
const CLUSTER_SCENARIOS = ['cluster cache hit (L2, L1 off)', 'cluster cache hit + 4 limit rules']

/** Per cluster master: commands run (INFO commandstats, since the reset before the rounds), their mix, and keys held. */
function printSpread(masters: readonly number[], what: string): void {
  const rows = masters.map((port) => {
    const stats = redisCli(['-p', String(port), 'info', 'commandstats'])
    const byCommand = new Map<string, { calls: number; usec: number }>()
    for (const m of stats.matchAll(/^cmdstat_([^:]+):calls=(\d+),usec=\d+,usec_per_call=([\d.]+)/gm)) {
      if (!/^(config|info|cluster|ping|role|command|client|readonly|replconf)/.test(m[1]!)) byCommand.set(m[1]!, { calls: Number(m[2]), usec: Number(m[3]) })
    }
    const total = [...byCommand.values()].reduce((a, b) => a + b.calls, 0)
    const top = [...byCommand]
      .sort((a, b) => b[1].calls - a[1].calls)
      .slice(0, 4)
      .map(([c, x]) => `${c} ${x.calls} (${x.usec} us each)`)
      .join(', ')
    return { port, total, top, keys: Number(redisCli(['-p', String(port), 'dbsize']).trim()) }
  })
  const all = rows.reduce((a, r) => a + r.total, 0) || 1
  console.log(`\nRedis Cluster spread per master (${what}):`)
  for (const r of rows) {
    console.log(`  master :${r.port}: ${r.total} commands (${((100 * r.total) / all).toFixed(1)}%), ${r.keys} keys; most: ${r.top}`)
  }
}

/** Stops the proxies first (their last statistics flush still reaches Redis), then Redis and the baselines. */
async function stopAll(): Promise<void> {
  const isProxy = (p: ChildProcess) => p.spawnargs[1] === BIN
  const running = started.filter((p) => p.exitCode === null)
  for (const group of [running.filter(isProxy), running.filter((p) => !isProxy(p))]) {
    await Promise.all(group.map((p) => new Promise((r) => {
      p.once('exit', r)
      p.kill('SIGTERM')
    })))
  }
}

const run = args.includes('--buckets')
  ? () =>
      buckets({
        clients: flag('--bucket-clients', 1_000_000),
        seconds: flag('--duration', 180),
        idleSeconds: flag('--idle', 70),
        workers: WORKERS,
        connections: CONNECTIONS,
        modes: (args.includes('--bucket-modes') ? String(args[args.indexOf('--bucket-modes') + 1]) : 'embedded,redis')
          .split(',')
          .filter((m): m is 'embedded' | 'redis' => m === 'embedded' || m === 'redis'),
        stats: !args.includes('--no-stats'),
        bin: BIN,
        servers: SERVERS,
        freePort,
      })
  : args.includes('--soak')
  ? () =>
      soak({
        seconds: flag('--duration', 60),
        urls: flag('--urls', 100_000),
        l1Mb: flag('--l1-mb', 64),
        workers: WORKERS,
        connections: CONNECTIONS,
        bin: BIN,
        servers: SERVERS,
        freePort,
      })
  : main
run()
  .catch((err: Error) => {
    console.error(err.message)
    process.exitCode = 1
  })
  .finally(() => {
    setTimeout(() => {
      for (const p of started) if (p.exitCode === null) p.kill('SIGKILL')
      process.exit()
    }, 10_000).unref()
    return stopAll()
  })
