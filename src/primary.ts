import cluster, { type Worker } from 'node:cluster'
import { randomUUID } from 'node:crypto'
import { Supervisor, type WorkerState } from './cluster/supervisor.js'
import type { Server } from 'node:http'
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client'
import { isLoopback, type Config } from './config.js'
import { AdminError, createAdminServer, type AdminSources, type Readiness } from './admin/server.js'
import { createLogger, type Logger } from './log.js'
import { leaseFigures } from './limiter/metrics.js'
import { MemoryPool } from './limiter/pool.js'
import { RulesController, withRules } from './limiter/rules-controller.js'
import { StatsCollector } from './stats/collector.js'
import { RedisStatsStore } from './stats/redis-store.js'
import { MemoryStatsStore } from './stats/store.js'
import type { Purge } from './cache/http-cache.js'
import { dropSharedMatching, pathGlobMatcher } from './cache/tiers.js'
import { PURGE_CHANNEL } from './redis/keys.js'
import {
  dispatch,
  type Handlers,
  type ToPrimary,
  type CachePurgeMessage,
  type LeaseGrantMessage,
  type LimitsResetMessage,
  type SetRulesMessage,
} from './messages.js'
import { BreakerBoard } from './proxy/breaker-board.js'
import { closeRedis, createRedis } from './redis/client.js'

/**
 * The primary process: forks the workers (they share the proxy socket), replaces any that die (with backoff when
 * they crash-loop), reloads on SIGHUP by replacing workers one at a time, drains on SIGTERM/SIGINT, and serves the
 * admin listener with metrics aggregated from every worker.
 */

/** How often the statistics the workers sent are written to the store. */
const STATS_FLUSH_MS = 1_000

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
  let reloading = false
  /** Each worker's circuit breakers as it last reported them. */
  const breakers = new BreakerBoard()
  const startedAt = Date.now()

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
      this.set(supervisor.listening)
    },
  })
  void listeningGauge

  const redis = createRedis(config, 'primary', log)

  // Statistics: the workers send batches over IPC; they are written to Redis (or kept here) once a second.
  const retention = { minute: config.statsRetention, hour: config.statsRollupRetention }
  const collector = config.stats
    ? new StatsCollector(redis !== null ? new RedisStatsStore(redis, retention) : new MemoryStatsStore(retention), log)
    : null
  const statsTimer = setInterval(() => void collector?.flush(), STATS_FLUSH_MS)
  statsTimer.unref()

  // The instance's own limiter pool: the only one without Redis, the fallback with it (see src/limiter).
  const counter = new MemoryPool()
  const sweep = setInterval(() => counter.sweep(maxWindowMs(config)), 10_000)
  sweep.unref()

  // One connection for the channels (a subscribed client can do nothing else): rules, resets, cache purges.
  const rulesSubscriber = redis === null ? null : createRedis(config, 'primary-sub', log, { enableOfflineQueue: true })
  // Rule sets: the config file's, or one stored through the admin API (src/limiter/rules-controller.ts).
  const rulesCtl = new RulesController(config, {
    redis,
    subscriber: rulesSubscriber,
    pool: counter,
    log,
    apply(next) {
      config = withRules(config, next)
      for (const w of supervisor.all()) sendRules(w)
    },
    dropLeases(rule, bucket) {
      const msg: LimitsResetMessage = { meliproxy: 'limits-reset', rule, bucket }
      for (const w of supervisor.all()) if (w.worker.isConnected()) w.worker.send(msg)
    },
  })

  /**
   * Cache purges have one owner, this primary: each worker of this instance drops the keys once (not the worker that
   * sent them, which already did), and other instances hear of it on the channel, tagged with this instance's id so
   * that this instance ignores its own message. (An older instance reads the same message: keys or glob, and `from`.)
   */
  const instanceId = randomUUID()
  function fanOutPurge(purge: Purge, sender: number | null): void {
    deliverPurge(purge, sender)
    redis?.publish(PURGE_CHANNEL, JSON.stringify({ ...purge, from: instanceId })).catch(() => {})
  }
  function deliverPurge(purge: Purge, except: number | null): void {
    const msg: CachePurgeMessage = { meliproxy: 'cache-purge', purge }
    for (const w of supervisor.all()) if (w.worker.id !== except && w.worker.isConnected()) w.worker.send(msg)
  }
  rulesSubscriber?.subscribe(PURGE_CHANNEL).catch(() => {})
  rulesSubscriber?.on('message', (channel: string, text: string) => {
    if (channel !== PURGE_CHANNEL) return
    try {
      const m = JSON.parse(text) as Purge & { from?: string }
      if (m.from !== instanceId) deliverPurge({ keys: m.keys, glob: m.glob }, null)
    } catch {
      log.warn('ignored a malformed cache purge message')
    }
  })

  // The workers (src/cluster/supervisor.ts): forked, replaced when they die, replaced one by one on reload.
  const supervisor: Supervisor = new Supervisor(
    {
      config: () => config,
      rulesVersion: () => rulesCtl.current.version.version,
      // Rules that changed while it started (its config was taken at fork time).
      listening: (state) => {
        if (state.rulesVersion !== rulesCtl.current.version.version) sendRules(state)
      },
      exited: (id) => breakers.forget(id),
      restarted: () => restarts.inc(),
      stopped: () => finishShutdown(),
    },
    log,
  )
  const fromWorkers: Handlers<ToPrimary, [Worker]> = {
    'lease-acquire'(msg, worker) {
      const reply: LeaseGrantMessage = { meliproxy: 'lease-grant', id: msg.id, grant: counter.acquire(msg.req) }
      if (worker.isConnected()) worker.send(reply)
    },
    'lease-release'(msg) {
      counter.release(msg.key, msg.windowStart, msg.tokens)
    },
    breaker: (msg, worker) => breakers.report(worker.id, msg),
    stats(msg) {
      collector?.add(msg.batches)
    },
    'cache-purge': (msg, worker) => fanOutPurge(msg.purge, worker.id),
  }
  cluster.on('message', (worker, msg: unknown) => dispatch(fromWorkers, msg, worker))

  /** Tells a listening worker to enforce the current rule set (one still starting hears it once it listens). */
  function sendRules(state: WorkerState): void {
    if (!state.listening || !state.worker.isConnected()) return
    const rules = rulesCtl.current
    const msg: SetRulesMessage = {
      meliproxy: 'set-rules',
      version: rules.version.version,
      limits: rules.limits,
      allow: rules.allow,
      deny: rules.deny,
    }
    state.worker.send(msg)
    state.rulesVersion = rules.version.version
  }

  async function reload(): Promise<void> {
    if (reloading || supervisor.stopping) return
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
      next = rulesCtl.reload(next)
      log.info('reloading: replacing workers one at a time', { workers: next.workers })
      config = next
      await supervisor.replaceAll(next)
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
    if (supervisor.stopping) {
      log.warn('second signal: exiting now', { signal })
      supervisor.kill()
      process.exit(1)
    }
    log.info('shutting down', {
      signal,
      workers: supervisor.active().length,
      shutdownDelayMs: config.shutdownDelay,
      drainTimeoutMs: config.drainTimeout,
    })
    // From now on /readyz answers 503, so a load balancer stops sending here. The workers keep serving for
    // --shutdown-delay while it notices; closing sooner races with requests it is still sending on pooled connections.
    supervisor.stop(config.shutdownDelay, config.drainTimeout)
  }

  function finishShutdown(): void {
    adminServer?.close()
    adminServer?.closeAllConnections()
    clearInterval(statsTimer)
    // The workers' last statistics are written before the connection closes (bounded: Redis may be gone).
    const flushed = collector === null ? Promise.resolve() : collector.flush()
    void Promise.race([flushed, new Promise((r) => setTimeout(r, 2_000))]).finally(() => {
      closeRedis(redis)
      closeRedis(rulesSubscriber)
      log.info('stopped')
      shutdownResolve?.()
    })
  }

  async function readiness(): Promise<Readiness> {
    const listening = supervisor.listening
    const reasons: string[] = []
    if (supervisor.stopping) reasons.push('shutting down')
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
    }
    // Readiness means "this instance can serve". Redis and the upstream are shared by every instance: their trouble
    // is reported here, never a reason to leave the load balancer (that would take every instance out at once, while
    // each keeps serving without Redis and answers fast while the upstream is away).
    return {
      ready: reasons.length === 0,
      reasons,
      workers: { listening, desired: config.workers },
      redis: redisState,
      upstreamBreaker: breakers.worstUpstream(),
      openRoutes: breakers.openRoutes(),
    }
  }


  async function metrics(): Promise<{ contentType: string; body: string }> {
    const [cluster, own] = await Promise.all([aggregator.clusterMetrics(), registry.metrics()])
    return { contentType: registry.contentType, body: cluster + own }
  }

  /** Purges a path glob: L1 of this instance's workers (IPC), of other instances (Redis pub/sub), then L2. */
  async function purgeCache(glob: string): Promise<{ removed: number } | { invalid: string }> {
    const match = pathGlobMatcher(config.upstream, glob)
    if (typeof match === 'string') return { invalid: match }
    fanOutPurge({ glob }, null)
    if (redis === null || redis.status !== 'ready') return { removed: 0 }
    const removed = await dropSharedMatching(redis, match)
    log.info('cache purged', { glob, removedFromL2: removed })
    return { removed }
  }

  /** The workers' lease figures; null when they do not all answer within 500 ms (e.g. while workers crash-loop). */
  async function limiterFigures(): Promise<ReturnType<typeof leaseFigures> | null> {
    const text = await Promise.race([
      aggregator.clusterMetrics().catch(() => null),
      new Promise<null>((r) => setTimeout(() => r(null), 500).unref()),
    ])
    return text === null ? null : leaseFigures(text)
  }

  async function redisRole(): Promise<string | null> {
    if (redis === null || redis.status !== 'ready') return null
    try {
      const role = (await Promise.race([redis.role(), new Promise((_, no) => setTimeout(no, 500).unref())])) as unknown[]
      return String(role[0])
    } catch {
      return null
    }
  }

  const sources: AdminSources = {
    readiness,
    metrics,
    purgeCache,
    async stats(q) {
      if (collector === null) throw new AdminError('stats_disabled', 'statistics are off (--no-stats)')
      try {
        return await collector.query(q)
      } catch (err) {
        throw new AdminError('redis_unavailable', `statistics could not be read: ${(err as Error).message}`)
      }
    },
    limits: () => rulesCtl.current.version,
    putLimits: (doc, source) => rulesCtl.put(doc, source),
    limitsHistory: () => rulesCtl.history(),
    resetLimit: (rule, key) => rulesCtl.reset(rule, key),
    async status() {
      const sentinel = config.redisSentinels.length > 0
      return {
        version: options.version,
        pid: process.pid,
        startedAt: new Date(startedAt).toISOString(),
        uptimeSeconds: Math.round((Date.now() - startedAt) / 1000),
        upstream: config.upstream,
        workers: {
          desired: config.workers,
          listening: supervisor.listening,
          restarts: supervisor.restarts,
          pids: supervisor.active().map((w) => w.worker.process.pid),
        },
        redis: {
          configured: redis !== null,
          mode: redis === null ? 'none' : sentinel ? 'sentinel' : 'standalone',
          state: redis?.status ?? 'none',
          role: await redisRole(),
        },
        limiter: await limiterFigures(),
        rules: {
          version: rulesCtl.current.version.version,
          source: rulesCtl.current.version.source,
          updatedAt: rulesCtl.current.version.updatedAt,
          count: rulesCtl.current.limits.length,
        },
        stats: { enabled: collector !== null, store: collector?.storeKind ?? null, dropped: collector?.dropped ?? 0 },
        cache: { enabled: config.cache },
        upstreamBreaker: { state: breakers.worstUpstream(), workers: breakers.perWorker().upstream },
        routeBreakers: { open: breakers.openRoutes(), workers: breakers.perWorker().routes },
      }
    },
    get adminToken() {
      return config.adminToken // read on each call: a SIGHUP may change it
    },
    get tokenForReads() {
      return !isLoopback(config.adminHost)
    },
  }
  adminServer = createAdminServer(sources, (err) => log.error('admin error', { error: err.message }))
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

  supervisor.start(config.workers)
  await new Promise<void>((resolve) => {
    shutdownResolve = resolve
  })
}
