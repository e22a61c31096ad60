import cluster from 'node:cluster'
import { AggregatorRegistry, Registry } from 'prom-client'
import { toPrimary } from './cluster/ipc.js'
import type { Config } from './config.js'
import { DelayQueues } from './limiter/delays.js'
import { Limiter } from './limiter/limiter.js'
import { LimiterMetrics } from './limiter/metrics.js'
import { SWEEP_MS } from './limiter/leases.js'
import { PrimaryPool } from './limiter/primary-pool.js'
import { RedisPool } from './limiter/redis-pool.js'
import { RuleSet } from './limiter/rules.js'
import { AccessLog, createLogger, journaldStream, type Logger } from './log.js'
import { dispatch, type Handlers, type ToWorker, type LeaseAcquireMessage, type LeaseReleaseMessage } from './messages.js'
import { WorkerMetrics } from './metrics.js'
import { IpSet } from './net/ip.js'
import { Exchange } from './exchange.js'
import {
  bodyOptions,
  breakerOptions,
  cacheOptions,
  guardOptions,
  keyOptions,
  redisConnection,
  serverOptions,
  tierOptions,
  upstreamOptions,
  upstreamTimeouts,
} from './options.js'
import { HttpCache } from './cache/http-cache.js'
import type { Purge } from './cache/types.js'
import { bodyStage } from './pipeline/body.js'
import { cacheStage } from './pipeline/cache.js'
import { guardStage } from './pipeline/guard.js'
import { limitStage } from './pipeline/limit.js'
import { Pipeline } from './pipeline/pipeline.js'
import { recorder } from './pipeline/record.js'
import { Upstream, upstreamStage } from './pipeline/upstream.js'
import { CacheMetrics } from './cache/metrics.js'
import { Tiers } from './cache/tiers.js'
import { breakerReporter, Breakers } from './proxy/breakers.js'
import { UpstreamMetrics } from './proxy/metrics.js'
import { RetryBudget } from './proxy/retry.js'
import { upstreamDispatcher } from './proxy/upstream-dispatcher.js'
import { SlowBodies } from './proxy/request-body.js'
import { ProxyServer, type ProxyServerHooks } from './proxy/server.js'
import { closeRedis, createRedis } from './redis/client.js'
import type { RedisClient } from './redis/cluster.js'
import { StatsRecorder } from './stats/recorder.js'
import { RouteNamer } from './stats/routes.js'

/**
 * A worker process: builds its parts from the Config (one short function each, below), composes the request path
 * (`pipeline`: guard -> limit -> body -> cache -> upstream, src/pipeline/) and serves it on the socket it shares with
 * the other workers; every request is recorded once, when its response closes.
 */

/** How long a cache miss lease lasts (and a waiter waits for the peer fetching). */
const LEASE_MS = 3_000
/** How often the statistics counted here go to the primary. */
const STATS_FLUSH_MS = 1_000

/** What every part of a worker may use: its id, logs, metric registry and request counter. */
interface Base {
  readonly id: number
  readonly log: Logger
  readonly accessLog: AccessLog | null
  readonly registry: Registry
  readonly metrics: WorkerMetrics
  /** Requests being answered now (the server's drain and a gauge read it). */
  readonly load: { inFlight: number }
}

/** A worker: built from its Config; `start` listens, `close` drains, `closed` resolves once it is done. */
export class Worker {
  readonly #server: ProxyServer
  readonly #timers: NodeJS.Timeout[] = []
  readonly #tick: () => void
  readonly #sendStats: (then?: () => void) => void
  readonly #fromPrimary: (msg: unknown) => void
  /** The first start's promise (null: not started). */
  #started: Promise<void> | null = null
  #resolveClosed!: () => void
  /** Resolves once the worker drained and handed over its last statistics, leases and log lines. */
  readonly closed = new Promise<void>((r) => (this.#resolveClosed = r))

  constructor(config: Config) {
    const base = buildBase(config)
    // No automatic re-send of commands left unanswered by a dropped connection: a cache read simply misses, and the
    // limiter's give-backs are idempotent anyway (src/limiter/pool.ts).
    const redis = createRedis(redisConnection(config), `worker-${base.id}`, base.log, { commandTimeout: config.limiterTimeout, autoResendUnfulfilledCommands: false })
    const primaryPool = new PrimaryPool((msg: LeaseAcquireMessage | LeaseReleaseMessage) => toPrimary(msg))
    const limiterMetrics = new LimiterMetrics(base.registry)
    const limiter = buildLimiter(config, redis, primaryPool, limiterMetrics, base.log)
    /** Route names (`/items/:id`): the unit of statistics and of the per-route circuit breakers. */
    const routes = new RouteNamer(config.statsRoutes)
    const trusted = new IpSet(config.trustProxy)
    const { upstream, dispatcher } = buildUpstream(config, trusted, routes, base)
    const cache = config.cache ? buildCache(config, redis, upstream, base) : null
    const stats = config.stats ? new StatsRecorder(routes) : null

    const record = recorder({ metrics: base.metrics, stats, accessLog: base.accessLog, log: base.log })
    const bodies = bodyCounters(base.metrics)
    const slowBodies = new SlowBodies(config.requestBodyMinRate, () => bodies.slowStreamed.inc())
    // The request path, in order: each stage answers the exchange or hands it on (src/pipeline/).
    const pipeline = new Pipeline(
      [
        ['guard', guardStage(guardOptions(config), limiter)], // version, Transfer-Encoding, target, Host, header names, declared body size, deny list
        ['limit', limitStage(limiter, new DelayQueues(limiterMetrics), base.log)], // rate limits: 429, or RateLimit-* fields on the answer
        // a body up to --request-buffering read whole (a slow one never reaches the upstream), a larger one streamed
        ['body', bodyStage(bodyOptions(config), slowBodies, { buffered: () => bodies.buffered.inc(), streamed: () => bodies.streamed.inc() })],
        ['cache', cacheStage(cache)], // L1, L2, revalidation, collapsing; hits answered, the rest handed on (absent with --no-cache)
        ['upstream', upstreamStage(upstream)], // the upstream's answer, streamed (through the cache's fill, if any)
      ],
      {
        // Every request, once its response closed: in-flight count, metrics, statistics, the access log.
        record: (x) => {
          base.load.inFlight--
          record(x)
        },
        refused: (_x, err) => base.metrics.refused.labels(err.code).inc(),
        bug: (msg, x) => base.log.error(msg, { path: x.path }),
      },
    )

    /** Hands the statistics counted since the last call to the primary; `then` runs once the message is sent. */
    const sendStats = (then?: () => void): void => {
      const batches = stats?.take() ?? []
      if (batches.length === 0) return then?.()
      toPrimary({ meliproxy: 'stats', batches }, then)
    }

    /** After the drain: the last access-log lines, leases and statistics go out (waiting at most 1 s), then `closed`. */
    const exit = (): void => {
      for (const t of this.#timers) clearInterval(t)
      base.accessLog?.flush()
      base.log.info('drained, exiting')
      limiter.releaseAll() // tokens in hand go back before the connection closes
      closeRedis(redis)
      // The last statistics reach the primary before the worker goes.
      const sent = Promise.all([dispatcher.close(), new Promise<void>((r) => sendStats(r))])
      void Promise.race([sent, new Promise((r) => setTimeout(r, 1_000).unref())]).finally(() => {
        process.off('message', this.#fromPrimary)
        this.#resolveClosed()
      })
    }

    const hooks = serverHooks(base, trusted, bodies, (x) => pipeline.run(x), exit)
    const server = new ProxyServer(serverOptions(config), hooks, base.log)
    const handlers = primaryHandlers(config, limiter, primaryPool, cache, server, base.log)

    this.#server = server
    this.#tick = () => limiter.sweep()
    this.#sendStats = sendStats
    this.#fromPrimary = (msg) => dispatch(handlers, msg)
  }

  /**
   * Listens on the proxy port (shared with the other workers), starts its timers and hears the primary; once: a
   * second call returns the first one's promise, and a worker closed before it started stays closed.
   */
  start(): Promise<void> {
    if (this.#started !== null) return this.#started
    if (this.#server.draining) return (this.#started = Promise.resolve())
    this.#timers.push(setInterval(this.#tick, SWEEP_MS).unref(), setInterval(() => this.#sendStats(), STATS_FLUSH_MS).unref())
    process.on('message', this.#fromPrimary)
    return (this.#started = this.#server.listen())
  }

  /** The proxy port it listens on (with port 0 in a test: the one the system chose). */
  port(): number | null {
    return this.#server.port()
  }

  /** Stops taking connections and drains the open ones (SIGTERM, SIGINT, or the primary's drain message). */
  close(reason: string): void {
    this.#server.drain(reason)
  }
}

/** The worker's id, loggers and metric registry (answering the primary's metric requests over IPC). */
function buildBase(config: Config): Base {
  const id = cluster.worker?.id ?? 0
  const registry = new Registry()
  AggregatorRegistry.setRegistries([registry])
  new AggregatorRegistry() // answers the primary's metric requests over IPC (prom-client's cluster protocol)
  const load = { inFlight: 0 }
  return {
    id,
    log: createLogger(config.logLevel, process.stderr, { worker: id }, journaldStream(2)),
    accessLog: config.accessLog ? new AccessLog(process.stdout, id) : null,
    registry,
    metrics: new WorkerMetrics(registry, () => load.inFlight),
    load,
  }
}

/** What the server hands the worker: requests to serve, refusals to log and count, the load, the end of the drain. */
function serverHooks(base: Base, trusted: IpSet, bodies: ReturnType<typeof bodyCounters>, run: (x: Exchange) => void, drained: () => void): ProxyServerHooks {
  return {
    serve(req, res) {
      base.load.inFlight++
      run(new Exchange(req, res, trusted))
    },
    refused(r) {
      if (r.counted) base.metrics.refused.labels(r.reason).inc()
      base.accessLog?.write({ time: Date.now(), ip: r.ip, method: r.method, path: r.path, status: r.status, bytes: r.bytes, reason: r.reason, durationMs: 0, upstreamMs: null })
    },
    refusedDuring(x, reason) {
      // A request that went upstream is not a refusal; its body's timeout is counted as a slow body either way.
      if (reason === 'ERR_HTTP_REQUEST_TIMEOUT') (x.forwarded ? bodies.slowStreamed : bodies.slowBuffered).inc()
      if (!x.forwarded) base.metrics.refused.labels(reason).inc()
    },
    atCap: (action) => base.metrics.connectionsAtCap.labels(action).inc(),
    inFlight: () => base.load.inFlight,
    drained,
  }
}

/** The request-body counters, by how the body went upstream (buffered whole, or streamed). */
function bodyCounters(metrics: WorkerMetrics) {
  return {
    buffered: metrics.requestBodies.labels('buffered'),
    streamed: metrics.requestBodies.labels('streamed'),
    slowBuffered: metrics.slowBodies.labels('buffered'),
    slowStreamed: metrics.slowBodies.labels('streamed'),
  }
}

/** The limiter: the rules of the Config, leasing from Redis (if any) and from the primary. */
function buildLimiter(config: Config, redis: RedisClient | null, primary: PrimaryPool, metrics: LimiterMetrics, log: Logger): Limiter {
  const rules = new RuleSet(config.limits, config.allow, config.deny, 1, keyOptions(config))
  const stores = { redis: redis === null ? null : new RedisPool(redis, metrics), primary, instances: config.instances, workers: config.workers }
  return new Limiter(rules, stores, metrics, log)
}

/** The upstream: an undici pool composed with the per-route breakers and the retries (src/proxy/upstream-dispatcher.ts). */
function buildUpstream(config: Config, trusted: IpSet, routes: RouteNamer, base: Base): { upstream: Upstream; dispatcher: ReturnType<typeof upstreamDispatcher> } {
  const metrics = new UpstreamMetrics(base.registry)
  const breakers: Breakers = new Breakers(
    breakerOptions(config),
    breakerReporter(metrics, base.log, config.breakerOpenTime, () => breakers.openRoutes().length, (msg) => toPrimary(msg)),
  )
  const dispatcher = upstreamDispatcher(config.upstream, upstreamTimeouts(config), {
    breakers,
    budget: new RetryBudget(config.retryBudget),
    retries: config.retries,
    onRetry: () => metrics.retries.inc(),
    onRefused: () => metrics.refused.inc(),
  })
  return { upstream: new Upstream(upstreamOptions(config), dispatcher, trusted, routes), dispatcher }
}

/** The two-tier cache; background refreshes go through `upstream`, purges to the primary (it fans them out). */
function buildCache(config: Config, redis: RedisClient | null, upstream: Upstream, base: Base): HttpCache {
  const metrics = new CacheMetrics(base.registry)
  const io = {
    upstream,
    // The primary owns the fan-out: this instance's other workers by IPC, other instances through Redis.
    publishPurge: (purge: Purge) => toPrimary({ meliproxy: 'cache-purge', purge }),
  }
  return new HttpCache(new Tiers(redis, tierOptions(config), metrics), io, cacheOptions(config, LEASE_MS), metrics)
}

/** What the primary tells a worker: lease grants, purges, the drain, resets and new rule sets. */
function primaryHandlers(config: Config, limiter: Limiter, primaryPool: PrimaryPool, cache: HttpCache | null, server: ProxyServer, log: Logger): Handlers<ToWorker> {
  /** Enforces `next`; the leases of a kept rule whose generation changed (a reset) are dropped: nothing counts them now. */
  const useRules = (next: RuleSet): void => {
    const before = new Map(limiter.rules.rules.map((r) => [r.name, r.prefix]))
    limiter.replaceRules(next)
    for (const r of next.rules) {
      const old = before.get(r.name)
      if (old !== undefined && old !== r.prefix) limiter.forget(old, null)
    }
  }
  return {
    'lease-grant': (msg) => primaryPool.deliver(msg),
    'cache-purge': (msg) => cache?.dropLocal(msg.purge),
    drain: () => server.drain('primary asked'),
    'limits-reset': (msg) => {
      if (msg.bucket !== null) return limiter.forget(msg.rule, msg.bucket)
      useRules(limiter.rules.withGenerations({ ...limiter.rules.generations, [msg.rule]: msg.generation }))
    },
    'set-rules': (msg) => {
      useRules(new RuleSet(msg.limits, msg.allow, msg.deny, msg.version, { ...keyOptions(config), generations: msg.generations }))
      log.info('rules replaced', { version: msg.version, rules: msg.limits.length })
    },
  }
}
