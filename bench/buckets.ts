import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { LeaseTable, SWEEP_MS, type TakeItem } from '../src/limiter/leases.js'
import { MemoryPool, shapeOf, type LeasePool } from '../src/limiter/pool.js'
import type { Giveback, LeaseGrant, LeaseRequest } from '../src/limiter/types.js'
import { childPids, rssMb } from './procs.js'

/**
 * `npm run bench -- --buckets`: memory and sweep pauses with many distinct per-client buckets (issue 19, item 6).
 *
 * meliproxy (the real binary, cache on, `--trust-proxy 127.0.0.1`) runs a per-client 1-minute rule next to a 24 h
 * global rule, both with limits the bench never reaches. A load generator (autocannon, in a child process so the
 * sampling here keeps its clock) sends every request with a new client address in X-Forwarded-For, counted up from
 * 11.0.0.0, to one cacheable path, so each request is an L1 hit that makes a new bucket. It runs until `clients`
 * requests were answered or `seconds` passed, then everything idles `idleSeconds` (long enough for the 1-minute
 * buckets to end and be swept). RSS of the primary and of each worker is read from /proc every second.
 *
 * Two modes in one run: embedded (no Redis: the primary's pool holds every bucket, the workers lease from it over IPC)
 * and Redis (a redis-server this bench starts on a free loopback port holds the buckets; the primary's pool is only
 * the fallback). The table gives, per mode, what was sent, the rate, peak and idle RSS, the bucket gauges at the end
 * of the load and after the idle time, and the longest sweep the primary's pool and any worker's lease table made
 * (meliproxy_limiter_pool_sweep_max_seconds, meliproxy_limiter_lease_sweep_max_seconds: since start, warm-up included).
 * Those are wall time: on a shared machine they include time the process was not running, so the longest stall of
 * this (idle) bench process in the same time is printed next to them, with CPU time per request of each process.
 *
 * First, the same sweeps on their own (see `isolated`): the src/limiter classes in this process with a simulated
 * clock and every one of `clients` buckets alive at once, timed in CPU time and with garbage collection split out,
 * and their heap per bucket.
 */

export interface BucketsOptions {
  /** Distinct client addresses to send (one request each). */
  readonly clients: number
  /** Longest the load of one mode may run. */
  readonly seconds: number
  /** Idle time after the load before the last reading (above 60 s: the 1-minute buckets must end first). */
  readonly idleSeconds: number
  readonly workers: number
  readonly connections: number
  /** Which modes to run, in order. */
  readonly modes: readonly ('embedded' | 'redis')[]
  /** Usage statistics on (meliproxy's default; they keep per-client heavy hitters too, bounded). */
  readonly stats: boolean
  readonly bin: string
  readonly servers: string
  readonly freePort: () => Promise<number>
}

/** The rules: one bucket per client for a minute, one global bucket for a day; neither limit is ever reached. */
const RULES = [
  { name: 'per-client', per: ['ip'], limit: 1_000_000, window: '1m' },
  { name: 'daily', limit: 1_000_000_000, window: '24h' },
]
const PATH = '/categories/MLA97994'
/** First client address of the load (11.0.0.0) and of the warm-up (100.64.0.0): disjoint ranges. */
const LOAD_BASE = 0x0b000000
const WARM_BASE = 0x64400000
const WARM_SECONDS = 4
const WARM_CLIENTS = 40_000

const LOAD_CHILD = 'buckets-load'

/** CPU time (user + system) a process has used, in seconds (/proc/PID/stat, in clock ticks of 1/100 s). */
function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) / 100
  } catch {
    return NaN
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** The first sample of each metric named in `names` (summed when it has several series). */
async function readMetrics(adminUrl: string, names: readonly string[]): Promise<Record<string, number>> {
  const out: Record<string, number> = {}
  for (const n of names) out[n] = NaN
  try {
    const text = await (await fetch(`${adminUrl}/metrics`)).text()
    for (const line of text.split('\n')) {
      if (line.startsWith('#')) continue
      const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line)?.[0]
      if (name === undefined || !(name in out)) continue
      const v = Number(line.slice(line.lastIndexOf(' ') + 1))
      out[name] = Number.isNaN(out[name]!) ? v : out[name]! + v
    }
  } catch {
    // the reading stays NaN
  }
  return out
}

const POOL_BUCKETS = 'meliproxy_limiter_pool_buckets'
const POOL_SWEEP = 'meliproxy_limiter_pool_sweep_max_seconds'
const LEASE_BUCKETS = 'meliproxy_limiter_lease_buckets'
const LEASE_SWEEP = 'meliproxy_limiter_lease_sweep_max_seconds'
const HEAP_USED = 'nodejs_heap_size_used_bytes'
/** Decisions made on the primary's pool because Redis was unusable (in the Redis mode they put buckets in the pool). */
const FALLBACKS = 'meliproxy_limiter_fallbacks_total'
/** Units admitted on offline shares because the primary did not answer a lease request in time. */
const OFFLINE = 'meliproxy_limiter_offline_units_total'
const METRICS = [POOL_BUCKETS, POOL_SWEEP, LEASE_BUCKETS, LEASE_SWEEP, HEAP_USED, FALLBACKS, OFFLINE] as const

/** What redis-server holds: keys and used memory (MB). */
function redisInfo(port: number | null): { keys: number; mb: number } | null {
  if (port === null) return null
  const cli = (...a: string[]): string => spawnSync('redis-cli', ['-p', String(port), ...a], { encoding: 'utf8' }).stdout ?? ''
  const keys = Number(cli('dbsize').trim())
  const used = Number(/used_memory:(\d+)/.exec(cli('info', 'memory'))?.[1] ?? NaN)
  return { keys, mb: used / 1024 / 1024 }
}

/** One mode's figures. */
interface ModeFigures {
  mode: string
  sent: number
  non2xx: number
  errors: number
  seconds: number
  rps: number
  /** CPU time per request answered, in microseconds: the primary, the workers together, the load generator. */
  cpuUs: { primary: number; workers: number; load: number }
  /** The longest event-loop delay of this (mostly idle) bench process meanwhile: what the machine alone stalls. */
  probeMaxMs: number
  startRss: { primary: number; worker: number }
  peakRss: { primary: number; worker: number }
  idleRss: { primary: number; worker: number }
  atEnd: Record<string, number>
  afterIdle: Record<string, number>
  redisAtEnd: { keys: number; mb: number } | null
  redisAfterIdle: { keys: number; mb: number } | null
}

/** What the load child reports on its stdout, one JSON object a line. */
type LoadReport =
  | { type: 'progress'; answered: number }
  | { type: 'done'; answered: number; non2xx: number; errors: number; timeouts: number; seconds: number; cpuSeconds: number }

/**
 * Runs the load generator as a child process (this file, with LOAD_CHILD first): `clients` requests at most, each with
 * the next client address from `base`, for `seconds` at most. Calls `progress` each second; resolves with the totals.
 */
function runLoad(
  port: number,
  clients: number,
  seconds: number,
  connections: number,
  base: number,
  progress: (answered: number) => void,
  started: ChildProcess[],
): Promise<Extract<LoadReport, { type: 'done' }>> {
  const self = fileURLToPath(import.meta.url)
  const child = spawn(process.execPath, [self, LOAD_CHILD, String(port), String(clients), String(seconds), String(connections), String(base)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  started.push(child)
  return new Promise((resolve, reject) => {
    let done: Extract<LoadReport, { type: 'done' }> | null = null
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const r = JSON.parse(line) as LoadReport
      if (r.type === 'progress') progress(r.answered)
      else done = r
    })
    child.once('exit', (code) => (done !== null ? resolve(done) : reject(new Error(`the load generator exited with ${code}`))))
  })
}

/** A dotted IPv4 address from a 32-bit number. */
function ipv4(n: number): string {
  return `${(n >>> 24) & 255}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`
}

/** The child: autocannon with a new X-Forwarded-For per request. */
async function loadChild(argv: string[]): Promise<void> {
  const [port, clients, seconds, connections, base] = argv.map(Number) as [number, number, number, number, number]
  interface Instance {
    on(event: 'response', cb: (client: unknown, status: number) => void): void
    stop(): void
  }
  interface Result {
    errors: number
    timeouts: number
    non2xx: number
    requests: { total: number }
  }
  type RequestData = { headers: Record<string, string> }
  const autocannon = createRequire(import.meta.url)('autocannon') as (
    opts: object,
    cb: (err: Error | null, result: Result) => void,
  ) => Instance
  let next = base
  let answered = 0
  const began = performance.now()
  const tick = setInterval(() => process.stdout.write(JSON.stringify({ type: 'progress', answered }) + '\n'), 1_000)
  const result = await new Promise<Result>((resolve, reject) => {
    const instance = autocannon(
      {
        url: `http://127.0.0.1:${port}${PATH}`,
        connections: Math.min(connections, clients),
        amount: clients,
        requests: [
          {
            setupRequest(req: RequestData): RequestData {
              req.headers['x-forwarded-for'] = ipv4(next++)
              return req
            },
          },
        ],
      },
      (err, r) => (err ? reject(err) : resolve(r)),
    )
    instance.on('response', () => answered++)
    // With `amount` autocannon has no time limit of its own.
    setTimeout(() => instance.stop(), seconds * 1_000).unref()
  })
  clearInterval(tick)
  const cpu = process.cpuUsage()
  const done: LoadReport = {
    type: 'done',
    answered,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    seconds: (performance.now() - began) / 1_000,
    cpuSeconds: (cpu.user + cpu.system) / 1e6,
  }
  process.stdout.write(JSON.stringify(done) + '\n')
}

async function waitReady(adminUrl: string): Promise<void> {
  for (let i = 0; i < 150; i++) {
    if ((await fetch(`${adminUrl}/readyz`).catch(() => null))?.status === 200) return
    await sleep(100)
  }
  throw new Error(`${adminUrl}/readyz did not answer 200`)
}

async function startRedis(port: number, started: ChildProcess[]): Promise<ChildProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'meliproxy-bench-redis-'))
  const p = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], {
    stdio: ['ignore', 'ignore', 'inherit'],
  })
  started.push(p)
  for (let i = 0; i < 50; i++) {
    const r = spawnSync('redis-cli', ['-p', String(port), 'ping'], { encoding: 'utf8' })
    if (r.stdout?.trim() === 'PONG') return p
    await sleep(100)
  }
  throw new Error(`redis-server on ${port} did not start`)
}

/** Stops one process this bench started, by its pid: SIGTERM, then SIGKILL after 5 s. */
async function stop(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return
  const exited = new Promise<void>((r) => p.once('exit', () => r()))
  p.kill('SIGTERM')
  const timer = setTimeout(() => p.kill('SIGKILL'), 5_000)
  await exited
  clearTimeout(timer)
}

async function runMode(o: BucketsOptions, mode: 'embedded' | 'redis', upstream: string, started: ChildProcess[]): Promise<ModeFigures> {
  const [port, adminPort] = [await o.freePort(), await o.freePort()]
  const redisPort = mode === 'redis' ? await o.freePort() : null
  const redis = redisPort === null ? null : await startRedis(redisPort, started)
  const dir = mkdtempSync(join(tmpdir(), 'meliproxy-buckets-'))
  const config = join(dir, 'limits.json')
  writeFileSync(config, JSON.stringify({ ...(redisPort === null ? {} : { redisUrl: `redis://127.0.0.1:${redisPort}` }), limits: RULES }))
  const proxy = spawn(
    process.execPath,
    [
      o.bin, '--port', String(port), '--host', '127.0.0.1', '--admin-port', String(adminPort), '--workers', String(o.workers),
      '--upstream', upstream, '--config', config, '--trust-proxy', '127.0.0.1', '--no-access-log', '--log-level', 'error',
      ...(o.stats ? [] : ['--no-stats']),
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  )
  started.push(proxy)
  const adminUrl = `http://127.0.0.1:${adminPort}`
  try {
    await waitReady(adminUrl)
    const primary = proxy.pid!
    const rss = (): { primary: number; worker: number; workers: number[] } => {
      const workers = childPids(primary).map(rssMb)
      return { primary: rssMb(primary), worker: Math.max(0, ...workers), workers }
    }
    console.log(`\n== ${mode}${redisPort === null ? ' (no Redis: the primary\'s pool holds the buckets)' : ` (redis-server on 127.0.0.1:${redisPort})`}`)
    // Warm-up: the JIT and keep-alive connections, with clients of their own range (their buckets expire in the load).
    await runLoad(port, WARM_CLIENTS, WARM_SECONDS, o.connections, WARM_BASE, () => {}, started)
    // A control for the sweep figures, which are wall time: an idle process's own longest stall in the same time.
    const probe = monitorEventLoopDelay({ resolution: 10 })
    probe.enable()
    const start = rss()
    const peak = { primary: start.primary, worker: start.worker }
    console.log(`after warm-up: RSS primary ${start.primary.toFixed(0)} MB, workers ${start.workers.map((v) => v.toFixed(0)).join(', ')} MB`)
    console.log('   s   answered    req/s  primary MB  workers MB   pool buckets  lease buckets')
    let answered = 0
    let lastAnswered = 0
    const began = Date.now()
    let second = 0
    let loading = true
    const sampler = (async () => {
      // Every second: RSS; every 5 s: a line with the bucket gauges (a scrape asks every worker over IPC).
      while (loading) {
        await sleep(1_000)
        second++
        const r = rss()
        peak.primary = Math.max(peak.primary, r.primary)
        peak.worker = Math.max(peak.worker, r.worker)
        if (second % 5 === 0 && loading) {
          const m = await readMetrics(adminUrl, METRICS)
          const rate = (answered - lastAnswered) / 5
          lastAnswered = answered
          console.log(
            `${String(Math.round((Date.now() - began) / 1_000)).padStart(4)} ${String(answered).padStart(10)} ${rate.toFixed(0).padStart(8)} ` +
              `${r.primary.toFixed(0).padStart(11)} ${r.workers.map((v) => v.toFixed(0)).join('/').padStart(11)} ` +
              `${String(m[POOL_BUCKETS]).padStart(14)} ${String(m[LEASE_BUCKETS]).padStart(14)}`,
          )
        }
      }
    })()
    const cpu = (): { primary: number; workers: number } => ({
      primary: cpuSeconds(primary),
      workers: childPids(primary).reduce((a, pid) => a + cpuSeconds(pid), 0),
    })
    const cpuBefore = cpu()
    const load = await runLoad(port, o.clients, o.seconds, o.connections, LOAD_BASE, (n) => (answered = n), started)
    const cpuAfter = cpu()
    loading = false
    await sampler
    const atEnd = await readMetrics(adminUrl, METRICS)
    const redisAtEnd = redisInfo(redisPort)
    console.log(
      `load done: ${load.answered} answered (${load.non2xx} non-2xx, ${load.errors} errors, ${load.timeouts} timeouts) in ${load.seconds.toFixed(1)} s; ` +
        `pool buckets ${atEnd[POOL_BUCKETS]}, lease buckets ${atEnd[LEASE_BUCKETS]}` +
        (redisAtEnd === null ? '' : `; Redis ${redisAtEnd.keys} keys, ${redisAtEnd.mb.toFixed(0)} MB`),
    )
    console.log(`idle ${o.idleSeconds} s (the 1-minute buckets end, the sweeps forget them)`)
    const idleBegan = Date.now()
    while (Date.now() - idleBegan < o.idleSeconds * 1_000) {
      await sleep(1_000)
      const r = rss()
      peak.primary = Math.max(peak.primary, r.primary)
      peak.worker = Math.max(peak.worker, r.worker)
      const s = Math.round((Date.now() - idleBegan) / 1_000)
      if (s % 10 === 0) {
        const m = await readMetrics(adminUrl, METRICS)
        console.log(
          `idle ${String(s).padStart(3)} s: RSS primary ${r.primary.toFixed(0)} MB, workers ${r.workers.map((v) => v.toFixed(0)).join('/')} MB; ` +
            `pool buckets ${m[POOL_BUCKETS]}, lease buckets ${m[LEASE_BUCKETS]}`,
        )
      }
    }
    const idle = rss()
    probe.disable()
    const afterIdle = await readMetrics(adminUrl, METRICS)
    const redisAfterIdle = redisInfo(redisPort)
    return {
      mode,
      sent: load.answered,
      non2xx: load.non2xx,
      errors: load.errors + load.timeouts,
      seconds: load.seconds,
      rps: load.answered / load.seconds,
      cpuUs: {
        primary: ((cpuAfter.primary - cpuBefore.primary) * 1e6) / load.answered,
        workers: ((cpuAfter.workers - cpuBefore.workers) * 1e6) / load.answered,
        load: (load.cpuSeconds * 1e6) / load.answered,
      },
      probeMaxMs: probe.max / 1e6,
      startRss: { primary: start.primary, worker: start.worker },
      peakRss: peak,
      idleRss: { primary: idle.primary, worker: idle.worker },
      atEnd,
      afterIdle,
      redisAtEnd,
      redisAfterIdle,
    }
  } finally {
    await stop(proxy)
    if (redis !== null) await stop(redis)
  }
}

/** Heap used after a full collection, in bytes. */
function heapAfterGc(): number {
  const gc = runInNewContext('gc') as () => void
  gc()
  gc()
  return process.memoryUsage().heapUsed
}

/** The two rules as the limiter's pools see them. */
const PER_CLIENT = { limit: 1_000_000, windowMs: 60_000, algorithm: 'fixed', burst: 1_000_000 } as const
const DAILY = { limit: 1_000_000_000, windowMs: 86_400_000, algorithm: 'fixed', burst: 1_000_000_000 } as const

/**
 * Times calls on this process's clock and splits out garbage collection: a collection that runs inside a sweep
 * blocks the loop as long, but it is the cost of everything the process allocates, not of the sweep's own work.
 */
class PauseMeter {
  readonly #calls: [number, number, number][] = []
  readonly #gcs: [number, number][] = []
  readonly #observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) this.#gcs.push([e.startTime, e.startTime + e.duration])
  })

  constructor() {
    this.#observer.observe({ entryTypes: ['gc'] })
  }

  /** Runs `fn`, recording its wall and CPU time. */
  time(fn: () => void): void {
    const c0 = process.cpuUsage()
    const t0 = performance.now()
    fn()
    const t1 = performance.now()
    const c = process.cpuUsage(c0)
    this.#calls.push([t0, t1, (c.user + c.system) / 1_000])
  }

  /** The longest call (wall, CPU, wall less the collections inside it) and the longest collection, in ms. */
  async result(): Promise<{ wall: number; cpu: number; withoutGc: number; gc: number }> {
    await new Promise((r) => setTimeout(r, 50)) // the observer's last entries
    this.#observer.disconnect()
    const r = { wall: 0, cpu: 0, withoutGc: 0, gc: 0 }
    for (const [s, e] of this.#gcs) r.gc = Math.max(r.gc, e - s)
    for (const [t0, t1, cpu] of this.#calls) {
      let inGc = 0
      for (const [s, e] of this.#gcs) if (s < t1 && e > t0) inGc += Math.min(e, t1) - Math.max(s, t0)
      r.wall = Math.max(r.wall, t1 - t0)
      r.cpu = Math.max(r.cpu, cpu)
      r.withoutGc = Math.max(r.withoutGc, t1 - t0 - inGc)
    }
    return r
  }
}

const f1 = (ms: number): string => ms.toFixed(1)

/**
 * The sweeps on their own, in this process, with a simulated clock: the classes the binary runs (src/limiter), driven
 * the way src/primary.ts and src/worker.ts drive them (the pool swept once a second, a lease table every SWEEP_MS).
 * `clients` buckets are made in the first 60 s, so all of them are alive at once in the pool, then 70 s more pass.
 * Each sweep is timed in wall time, in CPU time (on a shared machine wall time includes time the process did not
 * run at all), and in wall time less the garbage collections that ran inside it.
 */
async function isolated(clients: number, workers: number): Promise<void> {
  setFlagsFromString('--expose-gc')
  const perSecond = Math.ceil(clients / 60)
  const key = (i: number): string => `per-client|${ipv4(LOAD_BASE + i)}`
  const start = 1_800_000_000_000 - (1_800_000_000_000 % 60_000)

  // The primary's pool: an acquire per new bucket and one of the global bucket, and the give-back of the unused
  // rest of the client's lease (a worker sends it IDLE_RETURN_MS later); a sweep each second.
  {
    let now = start
    const pool = new MemoryPool(() => now)
    const base = heapAfterGc()
    const req = (k: string, r: typeof PER_CLIENT | typeof DAILY): LeaseRequest => ({ key: k, ...r, want: 16, need: 1, holders: workers })
    const shape = shapeOf(PER_CLIENT.algorithm, PER_CLIENT.limit, PER_CLIENT.windowMs, PER_CLIENT.burst)
    const sweeps = new PauseMeter()
    let made = 0
    let peak = { buckets: 0, heap: 0 }
    for (let second = 0; second < 130; second++) {
      for (let i = 0; i < perSecond && made < clients; i++, made++) {
        const k = key(made)
        const g = pool.acquire(req(k, PER_CLIENT))
        pool.acquire(req('daily', DAILY))
        const holder = `worker-${made % workers}`
        pool.release({ key: k, windowStart: g.windowStart, tokens: g.granted - 1, algorithm: 'fixed', shape, holder, seq: made + 1 })
      }
      if (second === 59) peak = { buckets: pool.size, heap: heapAfterGc() - base } // the first ones expire at 60 s
      now += 1_000
      sweeps.time(() => pool.sweep())
      await new Promise((r) => setImmediate(r))
    }
    const after = heapAfterGc() - base
    const t = await sweeps.result()
    console.log(
      `primary pool: ${clients} buckets made at ${perSecond}/s, ${peak.buckets} at once, ${pool.size} left after 70 s more; ` +
        `heap ${(peak.heap / 2 ** 20).toFixed(0)} MB with them (${(peak.heap / peak.buckets).toFixed(0)} bytes a bucket), ${(after / 2 ** 20).toFixed(1)} MB after\n` +
        `  longest sweep ${f1(t.wall)} ms wall, ${f1(t.cpu)} ms CPU, ${f1(t.withoutGc)} ms without GC; longest GC pause meanwhile ${f1(t.gc)} ms`,
    )
  }

  // One worker's lease table: a new bucket per request (leased from a pool that grants at once and keeps nothing, so
  // the heap measured is the table's), swept every SWEEP_MS; each give-back goes over IPC to a child process, as a
  // worker sends it to the primary. The worker's share of the clients: 1/workers.
  {
    const sink = spawn(process.execPath, ['-e', "process.on('message', () => {})"], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
    const flushed = (): Promise<void> => new Promise((r) => sink.send({ flush: true }, () => r()))
    let now = 0
    let wall = start
    let sent = 0
    const pool: LeasePool = {
      acquire: (r: LeaseRequest): Promise<LeaseGrant> => {
        const windowStart = wall - (wall % r.windowMs)
        return Promise.resolve({ granted: r.want, remaining: r.limit, resetMs: windowStart + r.windowMs - wall, windowStart, retryMs: 0 })
      },
      release: (g: Giveback): void => {
        sent++
        sink.send({ meliproxy: 'lease-release', giveback: g })
      },
    }
    const table = new LeaseTable(pool, workers, { leased: () => {}, returned: () => {} }, { now: () => now, holder: 'bench' })
    const item = (k: string, r: typeof PER_CLIENT | typeof DAILY): TakeItem => ({ key: k, ...r, shape: shapeOf(r.algorithm, r.limit, r.windowMs, r.burst), cost: 1 })
    const daily = item('daily', DAILY)
    const mine = Math.ceil(clients / workers)
    const perTick = Math.ceil(mine / 60 / (1_000 / SWEEP_MS))
    await flushed()
    const base = heapAfterGc()
    const sweeps = new PauseMeter()
    let made = 0
    let peak = { buckets: 0, heap: 0 }
    for (let tick = 0; tick < (130 * 1_000) / SWEEP_MS; tick++) {
      const takes: Promise<unknown>[] = []
      for (let i = 0; i < perTick && made < mine; i++, made++) {
        const r = table.take([item(key(made), PER_CLIENT), daily])
        if (r instanceof Promise) takes.push(r)
      }
      await Promise.all(takes)
      now += SWEEP_MS
      wall += SWEEP_MS
      sweeps.time(() => table.sweep())
      if (tick === 300) {
        // Steady state: as many buckets made as forgotten.
        await flushed()
        peak = { buckets: table.size, heap: heapAfterGc() - base }
      }
    }
    await flushed()
    const after = heapAfterGc() - base
    sink.kill('SIGTERM')
    const t = await sweeps.result()
    console.log(
      `worker lease table: ${mine} buckets at ${Math.ceil(mine / 60)}/s (one worker's share), ${peak.buckets} held at once (forgotten after ` +
        `FORGET_MS), ${table.size} left; ${sent} give-backs over IPC; heap ${(peak.heap / 2 ** 20).toFixed(1)} MB with them ` +
        `(${(peak.heap / Math.max(1, peak.buckets)).toFixed(0)} bytes a bucket), ${(after / 2 ** 20).toFixed(1)} MB after\n` +
        `  longest sweep ${f1(t.wall)} ms wall, ${f1(t.cpu)} ms CPU, ${f1(t.withoutGc)} ms without GC; longest GC pause meanwhile ${f1(t.gc)} ms`,
    )
  }
}

export async function buckets(o: BucketsOptions): Promise<void> {
  if (o.idleSeconds <= 60) console.log(`note: --idle ${o.idleSeconds} s is not longer than the 1-minute window: buckets may remain`)
  const hasRedis = spawnSync('sh', ['-c', 'command -v redis-server && command -v redis-cli']).status === 0
  const started: ChildProcess[] = []
  const upPort = await o.freePort()
  const upstream = spawn(process.execPath, [o.servers, 'upstream', String(upPort)], { stdio: ['ignore', 'ignore', 'inherit'] })
  started.push(upstream)
  console.log(
    `meliproxy buckets: up to ${o.clients} distinct clients (one request each) in at most ${o.seconds} s per mode, then ${o.idleSeconds} s idle; ` +
      `${o.workers} workers, autocannon ${o.connections} connections; rules: per ip 1m + global 24h; cache on (L1 hits); ` +
      `statistics ${o.stats ? 'on' : 'off'}`,
  )
  const figures: ModeFigures[] = []
  try {
    console.log('\nthe sweeps on their own (src/limiter classes in this process, simulated clock, every bucket alive at once):')
    await isolated(o.clients, o.workers)
    for (const mode of o.modes) {
      if (mode === 'redis' && !hasRedis) console.log('redis-server or redis-cli not found: the Redis mode is skipped')
      else figures.push(await runMode(o, mode, `http://127.0.0.1:${upPort}`, started))
    }
  } finally {
    for (const p of started) await stop(p)
  }
  const mb = (v: number): string => v.toFixed(0)
  const ms = (s: number | undefined): string => (s === undefined || Number.isNaN(s) ? '?' : (s * 1_000).toFixed(2))
  console.log('\nmode       clients     req/s  peak RSS MB      idle RSS MB      pool buckets       lease buckets      longest sweep ms')
  console.log('           sent               primary/worker   primary/worker   end/after idle     end/after idle     pool/leases')
  for (const f of figures) {
    console.log(
      `${f.mode.padEnd(9)} ${String(f.sent).padStart(8)} ${f.rps.toFixed(0).padStart(9)}  ` +
        `${`${mb(f.peakRss.primary)}/${mb(f.peakRss.worker)}`.padEnd(16)} ${`${mb(f.idleRss.primary)}/${mb(f.idleRss.worker)}`.padEnd(16)} ` +
        `${`${f.atEnd[POOL_BUCKETS]}/${f.afterIdle[POOL_BUCKETS]}`.padEnd(18)} ${`${f.atEnd[LEASE_BUCKETS]}/${f.afterIdle[LEASE_BUCKETS]}`.padEnd(18)} ` +
        `${ms(f.afterIdle[POOL_SWEEP])}/${ms(f.afterIdle[LEASE_SWEEP])}`,
    )
  }
  console.log('')
  for (const f of figures) {
    console.log(
      `${f.mode}: RSS after warm-up primary ${mb(f.startRss.primary)} MB, worker ${mb(f.startRss.worker)} MB; ` +
        `workers' V8 heap used (sum) ${mb(f.atEnd[HEAP_USED]! / 2 ** 20)} MB at end of load, ${mb(f.afterIdle[HEAP_USED]! / 2 ** 20)} MB after idle; ` +
        `CPU per request ${f.cpuUs.primary.toFixed(0)} us primary, ${f.cpuUs.workers.toFixed(0)} us workers, ${f.cpuUs.load.toFixed(0)} us load generator; ` +
        `longest stall of an idle probe process meanwhile ${f.probeMaxMs.toFixed(1)} ms; ` +
        `${f.afterIdle[FALLBACKS]} fallback decisions, ${f.afterIdle[OFFLINE]} offline units; ` +
        `${f.non2xx} non-2xx, ${f.errors} errors` +
        (f.redisAtEnd === null || f.redisAfterIdle === null
          ? ''
          : `; Redis ${f.redisAtEnd.keys} keys / ${f.redisAtEnd.mb.toFixed(0)} MB at end, ${f.redisAfterIdle.keys} keys / ${f.redisAfterIdle.mb.toFixed(0)} MB after idle`),
    )
  }
  console.log('(RSS is the kernel\'s figure: V8 keeps freed heap pages for a while, so RSS after idle can stay near the peak.)')
}

if (process.argv[2] === LOAD_CHILD && process.argv[1] === fileURLToPath(import.meta.url)) {
  loadChild(process.argv.slice(3)).catch((err: Error) => {
    console.error(err.message)
    process.exit(1)
  })
}
