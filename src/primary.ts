import cluster, { type Worker } from 'node:cluster'
import type { Server } from 'node:http'
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client'
import { encodeConfig, WORKER_CONFIG_ENV, type Config } from './config.js'
import { createAdminServer, type Readiness } from './admin/server.js'
import { createLogger, type Logger } from './log.js'
import { MemoryCounter } from './limiter/counter.js'
import { dropSharedMatching, pathGlobMatcher, PURGE_CHANNEL } from './cache/tiers.js'
import { isMeliproxyMessage, type CachePurgeMessage, type DrainMessage, type LimitResultMessage } from './messages.js'
import { closeRedis, createRedis } from './redis/client.js'

/**
 * The primary process: forks the workers (they share the proxy socket), replaces any that die (with backoff when
 * they crash-loop), reloads on SIGHUP by replacing workers one at a time, drains on SIGTERM/SIGINT, and serves the
 * admin listener with metrics aggregated from every worker.
 */

/** A worker that lived less than this counts as a crash at start. */
const SHORT_LIFE_MS = 5_000
const MAX_BACKOFF_MS = 30_000
/** How long a new worker may take to listen during a reload before the reload is abandoned. */
const LISTEN_TIMEOUT_MS = 10_000

interface WorkerState {
  readonly worker: Worker
  readonly startedAt: number
  listening: boolean
  /** Set when we asked it to drain: its exit is expected and not replaced. */
  retiring: boolean
}

/** The longest rule window: buckets older than that are dropped from the primary's counter. */
function maxWindowMs(config: Config): number {
  return config.limits.reduce((m, r) => Math.max(m, r.windowMs), 60_000)
}

/** What the CLI hands the primary: the config, and how to read it again on SIGHUP. */
export interface PrimaryOptions {
  readonly config: Config
  readonly reloadConfig: () => Config
  readonly version: string
}

/** Runs the primary until SIGTERM/SIGINT. */
export async function startPrimary(options: PrimaryOptions): Promise<void> {
  let config = options.config
  const log: Logger = createLogger(config.logLevel, process.stderr, { role: 'primary', pid: process.pid })
  const workers = new Map<number, WorkerState>()
  let crashes = 0
  let respawnTimer: NodeJS.Timeout | null = null
  let stopping = false
  let reloading = false

  const registry = new Registry()
  const aggregator = new AggregatorRegistry()
  const restarts = new Counter({
    name: 'meliproxy_worker_restarts_total',
    help: 'Workers replaced after dying unexpectedly',
    registers: [registry],
  })
  const listeningGauge = new Gauge({
    name: 'meliproxy_workers_listening',
    help: 'Workers currently serving the proxy port',
    registers: [registry],
    collect() {
      this.set(countListening())
    },
  })
  void listeningGauge

  const redis = createRedis(config, 'primary', log)

  // The instance's own limiter counter: the only one without Redis, the fallback with it (see src/limiter).
  const counter = new MemoryCounter()
  const sweep = setInterval(() => counter.sweep(maxWindowMs(config)), 10_000)
  sweep.unref()
  cluster.on('message', (worker, msg: unknown) => {
    if (!isMeliproxyMessage(msg)) return
    if (msg.meliproxy === 'limit-take') {
      const reply: LimitResultMessage = { meliproxy: 'limit-result', id: msg.id, result: counter.take(msg.items) }
      if (worker.isConnected()) worker.send(reply)
    } else if (msg.meliproxy === 'cache-purge') {
      // One worker's invalidation reaches every worker of this instance (Redis pub/sub reaches other instances).
      for (const w of workers.values()) if (w.worker.isConnected()) w.worker.send(msg)
    }
  })

  function countListening(): number {
    let n = 0
    for (const w of workers.values()) if (w.listening && !w.retiring) n++
    return n
  }

  function fork(cfg: Config): WorkerState {
    const worker = cluster.fork({ [WORKER_CONFIG_ENV]: encodeConfig(cfg) })
    const state: WorkerState = { worker, startedAt: Date.now(), listening: false, retiring: false }
    workers.set(worker.id, state)
    worker.on('listening', () => {
      state.listening = true
      log.debug('worker listening', { worker: worker.id, pid: worker.process.pid })
    })
    return state
  }

  function scheduleRespawn(): void {
    if (stopping || respawnTimer !== null) return
    const missing = config.workers - [...workers.values()].filter((w) => !w.retiring).length
    if (missing <= 0) return
    const delay = crashes === 0 ? 0 : Math.min(100 * 2 ** (crashes - 1), MAX_BACKOFF_MS)
    if (crashes > 0) log.warn('worker crash loop: backing off before respawn', { crashes, delayMs: delay })
    respawnTimer = setTimeout(() => {
      respawnTimer = null
      if (stopping) return
      for (let i = 0; i < missing; i++) fork(config)
    }, delay)
  }

  cluster.on('exit', (worker, code, signal) => {
    const state = workers.get(worker.id)
    workers.delete(worker.id)
    if (!state || state.retiring || stopping) {
      if (stopping && workers.size === 0) finishShutdown()
      return
    }
    const lived = Date.now() - state.startedAt
    crashes = lived < SHORT_LIFE_MS ? crashes + 1 : 0
    restarts.inc()
    log.error('worker died, replacing it', { worker: worker.id, pid: worker.process.pid, code, signal, livedMs: lived })
    scheduleRespawn()
  })

  /** Forks a replacement with `cfg`, waits until it listens, then drains `old`. Rejects if it never listens. */
  function replace(old: WorkerState, cfg: Config): Promise<void> {
    return new Promise((resolve, reject) => {
      const fresh = fork(cfg)
      const timer = setTimeout(() => {
        fresh.retiring = true
        fresh.worker.process.kill('SIGKILL')
        reject(new Error(`new worker did not listen within ${LISTEN_TIMEOUT_MS} ms`))
      }, LISTEN_TIMEOUT_MS)
      fresh.worker.once('listening', () => {
        clearTimeout(timer)
        drainWorker(old)
        resolve()
      })
      fresh.worker.once('exit', () => {
        clearTimeout(timer)
        reject(new Error('new worker exited before listening'))
      })
    })
  }

  function drainWorker(state: WorkerState): void {
    state.retiring = true
    const msg: DrainMessage = { meliproxy: 'drain' }
    if (state.worker.isConnected()) state.worker.send(msg)
  }

  async function reload(): Promise<void> {
    if (reloading || stopping) return
    reloading = true
    try {
      let next: Config
      try {
        next = options.reloadConfig()
      } catch (err) {
        log.error('reload rejected: the new config is invalid; the old one keeps serving', {
          error: (err as Error).message,
        })
        return
      }
      log.info('reloading: replacing workers one at a time', { workers: next.workers })
      const old = [...workers.values()].filter((w) => !w.retiring)
      config = next
      for (let i = 0; i < old.length; i++) {
        if (i < next.workers) await replace(old[i]!, next)
        else drainWorker(old[i]!)
      }
      for (let i = old.length; i < next.workers; i++) fork(next)
      log.info('reload complete', { workers: next.workers })
    } catch (err) {
      log.error('reload failed part-way; remaining old workers keep serving', { error: (err as Error).message })
    } finally {
      reloading = false
    }
  }

  let adminServer: Server | null = null
  let shutdownResolve: (() => void) | null = null

  function shutdown(signal: string): void {
    if (stopping) {
      log.warn('second signal: exiting now', { signal })
      for (const w of workers.values()) w.worker.process.kill('SIGKILL')
      process.exit(1)
    }
    stopping = true
    log.info('shutting down: draining workers', { signal, workers: workers.size, drainTimeoutMs: config.drainTimeout })
    if (respawnTimer !== null) clearTimeout(respawnTimer)
    for (const w of workers.values()) drainWorker(w)
    // A worker that ignores the drain is killed after the drain timeout plus a margin.
    setTimeout(() => {
      for (const w of workers.values()) w.worker.process.kill('SIGKILL')
    }, config.drainTimeout + 2_000).unref()
    if (workers.size === 0) finishShutdown()
  }

  function finishShutdown(): void {
    adminServer?.close()
    adminServer?.closeAllConnections()
    closeRedis(redis)
    log.info('stopped')
    shutdownResolve?.()
  }

  async function readiness(): Promise<Readiness> {
    const listening = countListening()
    const reasons: string[] = []
    if (stopping) reasons.push('shutting down')
    if (listening === 0) reasons.push('no worker is listening')
    let redisState: Readiness['redis'] = 'not configured'
    if (redis !== null) {
      redisState = await Promise.race([
        redis.ping().then(
          () => 'ok' as const,
          () => 'unreachable' as const,
        ),
        new Promise<'unreachable'>((r) => setTimeout(() => r('unreachable'), 500).unref()),
      ])
      if (redisState !== 'ok') reasons.push('redis is unreachable')
    }
    return { ready: reasons.length === 0, reasons, workers: { listening, desired: config.workers }, redis: redisState }
  }

  async function metrics(): Promise<{ contentType: string; body: string }> {
    const [cluster, own] = await Promise.all([aggregator.clusterMetrics(), registry.metrics()])
    return { contentType: registry.contentType, body: cluster + own }
  }

  /** Purges a path glob: L1 of this instance's workers (IPC), of other instances (Redis pub/sub), then L2. */
  async function purgeCache(glob: string): Promise<{ removed: number } | { invalid: string }> {
    const match = pathGlobMatcher(config.upstream, glob)
    if (typeof match === 'string') return { invalid: match }
    const msg: CachePurgeMessage = { meliproxy: 'cache-purge', purge: { glob } }
    for (const w of workers.values()) if (w.worker.isConnected()) w.worker.send(msg)
    if (redis === null || redis.status !== 'ready') return { removed: 0 }
    await redis.publish(PURGE_CHANNEL, JSON.stringify({ glob }))
    const removed = await dropSharedMatching(redis, match)
    log.info('cache purged', { glob, removedFromL2: removed })
    return { removed }
  }

  adminServer = createAdminServer(
    {
      readiness,
      metrics,
      purgeCache,
      get adminToken() {
        return config.adminToken // read on each call: a SIGHUP may change it
      },
    },
    (err) => log.error('admin error', { error: err.message }),
  )
  await new Promise<void>((resolve, reject) => {
    adminServer!.once('error', reject)
    adminServer!.listen(config.adminPort, config.adminHost, () => {
      adminServer!.off('error', reject)
      resolve()
    })
  })
  const adminAddress = adminServer.address()
  log.info('meliproxy started', {
    version: options.version,
    upstream: config.upstream,
    proxy: `${config.host}:${config.port}`,
    admin: typeof adminAddress === 'object' && adminAddress ? `${adminAddress.address}:${adminAddress.port}` : null,
    workers: config.workers,
  })

  process.on('SIGTERM', () => shutdown('SIGTERM'))
  process.on('SIGINT', () => shutdown('SIGINT'))
  process.on('SIGHUP', () => void reload())

  for (let i = 0; i < config.workers; i++) fork(config)
  await new Promise<void>((resolve) => {
    shutdownResolve = resolve
  })
}
