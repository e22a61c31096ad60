import cluster, { type Worker } from 'node:cluster'
import type { Server } from 'node:http'
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client'
import type { Config } from './config.js'
import { createAdminServer } from './admin/server.js'
import { adminSources } from './admin/sources.js'
import type { Purge } from './cache/types.js'
import { PurgeHub } from './cache/purge-hub.js'
import { broadcast, toWorker } from './cluster/ipc.js'
import { Supervisor, type WorkerState } from './cluster/supervisor.js'
import { createLogger, journaldStream, type Logger } from './log.js'
import { listenError, unusableAddress, unusableBecause } from './net/listen.js'
import { ConfigError } from './errors.js'
import { MemoryPool } from './limiter/pool.js'
import { STALE_REQUEST_MS } from './limiter/primary-pool.js'
import { RulesController, withRules } from './limiter/rules-controller.js'
import { dispatch, type Handlers, type ToPrimary, type CachePurgeMessage, type LeaseGrantMessage, type LimitsResetMessage, type SetRulesMessage } from './messages.js'
import { BreakerBoard } from './proxy/breaker-board.js'
import { closeRedis, createRedis, createSubscriber } from './redis/client.js'
import { redisConnection, statsOptions } from './options.js'
import { StatsService } from './stats/service.js'

/**
 * The primary process wires its parts: the workers' supervisor (fork, respawn, rolling replacement, drain), the
 * rules controller, the limiter's fallback pool, statistics, cache purges and the admin listener with metrics
 * aggregated from every worker. The CLI starts it, hands it the signals and exits with the code `stopped` gives.
 */

/** What the CLI hands the primary: the config, and how to read it again on SIGHUP. */
export interface PrimaryOptions {
  readonly config: Config
  readonly reloadConfig: () => Config
  readonly version: string
}

export class Primary {
  #config: Config
  readonly #options: PrimaryOptions
  readonly #log: Logger
  readonly #registry = new Registry()
  readonly #aggregator = new AggregatorRegistry()
  readonly #breakers = new BreakerBoard()
  readonly #redis
  /** One connection for the channels (a subscribed client can do nothing else): rules, resets, cache purges. */
  readonly #subscriber
  readonly #stats: StatsService
  /** The instance's own limiter pool: the only one without Redis, the fallback with it (see src/limiter). */
  readonly #pool = new MemoryPool()
  readonly #sweep: NodeJS.Timeout
  readonly #rules: RulesController
  readonly #purges: PurgeHub
  readonly #supervisor: Supervisor
  #admin: Server | null = null
  #reloading = false
  #resolveStopped!: (code: number) => void
  /** Resolves with the exit code once everything is stopped. */
  readonly stopped = new Promise<number>((r) => (this.#resolveStopped = r))

  constructor(options: PrimaryOptions) {
    this.#options = options
    this.#config = options.config
    const log = (this.#log = createLogger(this.#config.logLevel, process.stderr, { role: 'primary', pid: process.pid }, journaldStream(2)))
    const connection = redisConnection(this.#config)
    this.#redis = createRedis(connection, 'primary', log)
    this.#subscriber = createSubscriber(connection, 'primary-sub', log, this.#redis)
    this.#stats = new StatsService(statsOptions(this.#config), this.#redis, log)
    // Forgets buckets as they expire, at most 3 ms of work every 100 ms (never a walk of the whole pool).
    const pool = this.#pool
    let longestSweep = 0
    this.#sweep = setInterval(() => {
      const started = performance.now()
      pool.sweep()
      longestSweep = Math.max(longestSweep, performance.now() - started)
    }, 100)
    this.#sweep.unref()
    new Gauge({
      name: 'meliproxy_limiter_pool_buckets',
      help: "Buckets held in the primary's pool (embedded mode, and the Redis fallback)",
      registers: [this.#registry],
      collect() {
        this.set(pool.size)
      },
    })
    new Gauge({
      name: 'meliproxy_limiter_pool_sweep_max_seconds',
      help: "The longest the primary's pool sweep has held its event loop",
      registers: [this.#registry],
      collect() {
        this.set(longestSweep / 1000)
      },
    })

    // Rule sets: the config file's, or one stored through the admin API (src/limiter/rules-controller.ts).
    this.#rules = new RulesController(this.#config, {
      redis: this.#redis,
      subscriber: this.#subscriber,
      pool: this.#pool,
      log,
      apply: (next) => {
        this.#config = withRules(this.#config, next)
        for (const w of this.#supervisor.all()) this.#sendRules(w)
      },
      dropLeases: (rule, bucket, generation) => {
        const msg: LimitsResetMessage = { meliproxy: 'limits-reset', rule, bucket, generation }
        broadcast(this.#workers(), msg)
      },
    })
    this.#purges = new PurgeHub(this.#redis, this.#subscriber, (purge, except) => this.#deliverPurge(purge, except), log)

    const restarts = new Counter({ name: 'meliproxy_worker_restarts_total', help: 'Workers replaced after dying unexpectedly', registers: [this.#registry] })
    const supervisor = (this.#supervisor = new Supervisor(
      {
        config: () => this.#config,
        rulesVersion: () => this.#rules.current.version.version,
        // Rules that changed while it started (its config was taken at fork time), and the rules' generations (a
        // reset), which its config does not carry.
        listening: (state) => {
          const reset = Object.keys(this.#rules.generations).length > 0
          if (state.rulesVersion !== this.#rules.current.version.version || reset) this.#sendRules(state)
        },
        exited: (id) => this.#breakers.forget(id),
        restarted: () => restarts.inc(),
        stopped: () => void this.#finish(),
      },
      log,
    ))
    new Gauge({
      name: 'meliproxy_workers_listening',
      help: 'Workers currently serving the proxy port',
      registers: [this.#registry],
      collect() {
        this.set(supervisor.listening)
      },
    })
    const fromWorkers: Handlers<ToPrimary, [Worker]> = {
      'lease-acquire': (msg, worker) => {
        // A request its worker has given up on (the primary was stalled) would grant tokens nobody uses.
        if (Date.now() - msg.sent > STALE_REQUEST_MS) return
        const reply: LeaseGrantMessage = { meliproxy: 'lease-grant', id: msg.id, grant: this.#pool.acquire(msg.req) }
        toWorker(worker, reply)
      },
      'lease-release': (msg) => {
        for (const g of msg.givebacks) this.#pool.release(g)
      },
      breaker: (msg, worker) => this.#breakers.report(worker.id, msg),
      stats: (msg) => this.#stats.add(msg.batches),
      'cache-purge': (msg, worker) => this.#purges.publish(msg.purge, worker.id),
    }
    cluster.on('message', (worker, msg: unknown) => dispatch(fromWorkers, msg, worker))
  }

  /**
   * Listens on the admin port and starts the workers; throws a ConfigError naming the flag when an address can never
   * be listened on (src/net/listen.ts), the admin listener's own address included when it takes the proxy's.
   */
  async start(): Promise<void> {
    const config = this.#config
    const proxyError = await listenError(config.port, config.host)
    const proxyUnusable = unusableBecause(proxyError, config.port, config.host)
    if (proxyUnusable !== null) throw new ConfigError('--port', proxyUnusable)
    const admin = createAdminServer(
      adminSources({
        config: () => this.#config,
        version: this.#options.version,
        startedAt: Date.now(),
        supervisor: this.#supervisor,
        redis: this.#redis,
        breakers: this.#breakers,
        rules: this.#rules,
        stats: this.#stats,
        purges: this.#purges,
        aggregator: this.#aggregator,
        registry: this.#registry,
      }),
      (err) => this.#log.error('admin error', { error: err.message }),
    )
    this.#admin = admin
    const adminUnusable = await unusableAddress(config.adminPort, config.adminHost)
    if (adminUnusable !== null) throw new ConfigError('--admin-port', adminUnusable)
    await new Promise<void>((resolve, reject) => {
      admin.once('error', reject)
      admin.listen(config.adminPort, config.adminHost, () => {
        admin.off('error', reject)
        resolve()
      })
    })
    // The same port on an overlapping address (0.0.0.0 and 127.0.0.1, localhost and 127.0.0.1): free a moment ago, in
    // use now that the admin listener holds it, and every worker would fail to listen on it for as long as this runs.
    if (proxyError === null && config.port !== 0 && config.port === config.adminPort && (await listenError(config.port, config.host)) === 'EADDRINUSE') {
      admin.close()
      throw new ConfigError('--admin-port', `${config.adminHost}:${config.adminPort} takes the proxy's address ${config.host}:${config.port}: give the admin listener a port of its own`)
    }
    const address = admin.address()
    this.#log.info('meliproxy started', {
      version: this.#options.version,
      upstream: config.upstream,
      proxy: `${config.host}:${config.port}`,
      admin: typeof address === 'object' && address ? `${address.address}:${address.port}` : null,
      workers: config.workers,
    })
    this.#supervisor.start(config.workers)
  }

  /**
   * Stops (SIGTERM/SIGINT): /readyz answers 503 at once so a load balancer stops sending here; the workers keep
   * serving for --shutdown-delay while it notices (closing sooner races with requests it is still sending on pooled
   * connections), then drain for up to --drain-timeout. A second call kills the workers and stops with code 1.
   */
  close(signal: string): void {
    const config = this.#config
    if (this.#supervisor.stopping) {
      this.#log.warn('second signal: exiting now', { signal })
      this.#supervisor.kill()
      this.#resolveStopped(1)
      return
    }
    this.#log.info('shutting down', {
      signal,
      workers: this.#supervisor.active().length,
      shutdownDelayMs: config.shutdownDelay,
      drainTimeoutMs: config.drainTimeout,
    })
    this.#supervisor.stop(config.shutdownDelay, config.drainTimeout)
  }

  /** Reads the config again (SIGHUP) and replaces the workers one at a time; an invalid config changes nothing. */
  async reload(): Promise<void> {
    if (this.#reloading || this.#supervisor.stopping) return
    this.#reloading = true
    try {
      let next: Config
      try {
        next = this.#options.reloadConfig()
      } catch (err) {
        this.#log.error('reload rejected: the new config is invalid; the old one keeps serving', { error: (err as Error).message })
        return
      }
      // A proxy address that can never be listened on would leave every new worker failing, and the config the
      // workers that die later are replaced with: refused like an invalid config (a port in use is not refused).
      const unusable = await unusableAddress(next.port, next.host)
      if (unusable !== null) {
        this.#log.error('reload rejected: the new config is invalid; the old one keeps serving', { error: `--port: ${unusable}` })
        return
      }
      next = this.#rules.reload(next)
      this.#log.info('reloading: replacing workers one at a time', { workers: next.workers })
      this.#config = next
      await this.#supervisor.replaceAll(next)
      this.#log.info('reload complete', { workers: next.workers })
    } catch (err) {
      this.#log.error('reload failed part-way; remaining old workers keep serving', { error: (err as Error).message })
    } finally {
      this.#reloading = false
    }
  }

  /** Once every worker is gone: the admin listener closes, the last statistics are written, Redis is closed. */
  async #finish(): Promise<void> {
    this.#admin?.close()
    this.#admin?.closeAllConnections()
    clearInterval(this.#sweep)
    this.#rules.close()
    await this.#stats.close()
    closeRedis(this.#redis)
    closeRedis(this.#subscriber)
    this.#log.info('stopped')
    this.#resolveStopped(0)
  }

  /** Tells a listening worker to enforce the current rule set (one still starting hears it once it listens). */
  #sendRules(state: WorkerState): void {
    if (!state.listening) return
    const rules = this.#rules.current
    const msg: SetRulesMessage = {
      meliproxy: 'set-rules',
      version: rules.version.version,
      limits: rules.limits,
      allow: rules.allow,
      deny: rules.deny,
      generations: this.#rules.generations,
    }
    toWorker(state.worker, msg)
    state.rulesVersion = rules.version.version
  }

  /** Hands a purge to each worker of this instance but `except` (the one it came from). */
  #deliverPurge(purge: Purge, except: number | null): void {
    const msg: CachePurgeMessage = { meliproxy: 'cache-purge', purge }
    broadcast(this.#workers(), msg, except)
  }

  /** Every worker of this instance. */
  *#workers(): Iterable<Worker> {
    for (const state of this.#supervisor.all()) yield state.worker
  }
}
