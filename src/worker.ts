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
import { AccessLog, createLogger } from './log.js'
import {
  dispatch,
  type Handlers,
  type ToWorker,
  type LeaseAcquireMessage,
  type LeaseReleaseMessage,
} from './messages.js'
import { WorkerMetrics } from './metrics.js'
import { IpSet } from './net/ip.js'
import { Exchange } from './exchange.js'
import { HttpCache, type CacheIO, type Purge } from './cache/http-cache.js'
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
import { ProxyServer } from './proxy/server.js'
import { closeRedis, createRedis } from './redis/client.js'
import { StatsRecorder } from './stats/recorder.js'
import { RouteNamer } from './stats/routes.js'

/**
 * A worker process: builds its dependencies from the Config, composes the request path (`pipeline`: guard ->
 * limit -> body -> cache -> upstream, src/pipeline/) and serves it on the socket it shares with the other workers; every
 * request is recorded once, when its response closes (`record`).
 */

/** How long a cache miss lease lasts (and a waiter waits for the peer fetching). */
const LEASE_MS = 3_000
/** How often the statistics counted here go to the primary. */
const STATS_FLUSH_MS = 1_000

/** A worker: built from its Config; `start` listens, `close` drains, `closed` resolves once it is done. */
export class Worker {
  readonly #server: ProxyServer
  #resolveClosed!: () => void
  /** Resolves once the worker drained and handed over its last statistics, leases and log lines. */
  readonly closed = new Promise<void>((r) => (this.#resolveClosed = r))

  constructor(config: Config) {
    const workerId = cluster.worker?.id ?? 0
    const log = createLogger(config.logLevel, process.stderr, { worker: workerId })
    const accessLog = config.accessLog ? new AccessLog(process.stdout, workerId) : null

    const registry = new Registry()
    AggregatorRegistry.setRegistries([registry])
    new AggregatorRegistry() // answers the primary's metric requests over IPC (prom-client's cluster protocol)
    let inFlight = 0
    const metrics = new WorkerMetrics(registry, () => inFlight)

    // No automatic re-send of commands left unanswered by a dropped connection: a cache read simply misses, and the
    // limiter's give-backs are idempotent anyway (src/limiter/pool.ts).
    const redis = createRedis(config, `worker-${workerId}`, log, { commandTimeout: config.limiterTimeout, autoResendUnfulfilledCommands: false })
    const primaryPool = new PrimaryPool((msg: LeaseAcquireMessage | LeaseReleaseMessage) => toPrimary(msg))
    const limiterMetrics = new LimiterMetrics(registry)
    const limiter = new Limiter(
      new RuleSet(config.limits, config.allow, config.deny, 1, { ipv6Prefix: config.limitIpv6Prefix }),
      {
        redis: redis === null ? null : new RedisPool(redis, limiterMetrics),
        primary: primaryPool,
        instances: config.instances,
        workers: config.workers,
      },
      limiterMetrics,
      log,
    )
    setInterval(() => limiter.sweep(), SWEEP_MS).unref()

    /** Route names (`/items/:id`): the unit of statistics and of the per-route circuit breakers. */
    const routes = new RouteNamer(config.statsRoutes)
    const trusted = new IpSet(config.trustProxy)
    const upstreamMetrics = new UpstreamMetrics(registry)
    const breakers: Breakers = new Breakers(
      {
        failures: config.breakerFailures,
        errorRatio: config.breakerErrorRatio,
        windowMs: config.breakerWindow,
        minRequests: config.breakerMinRequests,
        openMs: config.breakerOpenTime,
      },
      breakerReporter(upstreamMetrics, log, config.breakerOpenTime, () => breakers.openRoutes().length, (msg) => toPrimary(msg)),
    )
    // The upstream: an undici pool composed with the breakers and the retries (src/proxy/upstream-dispatcher.ts).
    const dispatcher = upstreamDispatcher(
      config.upstream,
      { connect: config.connectTimeout, headers: config.headersTimeout, body: config.bodyTimeout },
      {
        breakers,
        budget: new RetryBudget(config.retryBudget),
        retries: config.retries,
        onRetry: () => upstreamMetrics.retries.inc(),
        onRefused: () => upstreamMetrics.refused.inc(),
      },
    )
    const upstream = new Upstream(config, dispatcher, trusted, routes)

    const cacheMetrics = new CacheMetrics(registry)
    const cacheIO: CacheIO = {
      upstream, // background refreshes
      // The primary owns the fan-out: this instance's other workers by IPC, other instances through Redis.
      publishPurge: (purge: Purge) => toPrimary({ meliproxy: 'cache-purge', purge }),
    }
    const cache = config.cache
      ? new HttpCache(
          new Tiers(redis, { l1Bytes: config.cacheL1Size, l2TtlCapMs: config.cacheL2TtlCap }, cacheMetrics),
          cacheIO,
          {
            origin: config.upstream,
            maxObjectBytes: config.cacheMaxObject,
            rules: config.cacheRules,
            targetedFields: config.cacheTargetedField === null ? ['cdn-cache-control'] : [config.cacheTargetedField, 'cdn-cache-control'],
            leaseMs: LEASE_MS,
          },
          cacheMetrics,
        )
      : null

    const stats = config.stats ? new StatsRecorder(routes) : null
    /** Hands the statistics counted since the last call to the primary; `then` runs once the message is sent. */
    function sendStats(then?: () => void): void {
      const batches = stats?.take() ?? []
      if (batches.length === 0) return then?.()
      toPrimary({ meliproxy: 'stats', batches }, then)
    }
    setInterval(() => sendStats(), STATS_FLUSH_MS).unref()

    const record = recorder({ metrics, stats, accessLog, log })
    const bodies = {
      buffered: metrics.requestBodies.labels('buffered'),
      streamed: metrics.requestBodies.labels('streamed'),
      slowBuffered: metrics.slowBodies.labels('buffered'),
      slowStreamed: metrics.slowBodies.labels('streamed'),
    }
    const slowBodies = new SlowBodies(config.requestBodyMinRate, () => bodies.slowStreamed.inc())
    // The request path, in order: each stage answers the exchange or hands it on (src/pipeline/).
    const pipeline = new Pipeline(
      [
        ['guard', guardStage(config, limiter)], // version, Transfer-Encoding, target, Host, header names, declared body size, deny list
        ['limit', limitStage(limiter, new DelayQueues(limiterMetrics), log)], // rate limits: 429, or RateLimit-* fields on the answer
        // a body up to --request-buffering read whole (a slow one never reaches the upstream), a larger one streamed
        ['body', bodyStage(config, slowBodies, { buffered: () => bodies.buffered.inc(), streamed: () => bodies.streamed.inc() })],
        ['cache', cacheStage(cache)], // L1, L2, revalidation, collapsing; hits answered, the rest handed on (absent with --no-cache)
        ['upstream', upstreamStage(upstream)], // the upstream's answer, streamed (through the cache's fill, if any)
      ],
      {
        // Every request, once its response closed: in-flight count, metrics, statistics, the access log.
        record: (x) => {
          inFlight--
          record(x)
        },
        refused: (_x, err) => metrics.refused.labels(err.code).inc(),
        bug: (msg, x) => log.error(msg, { path: x.path }),
      },
    )

    const server = new ProxyServer(
      config,
      {
        serve(req, res) {
          inFlight++
          pipeline.run(new Exchange(req, res, trusted))
        },
        refused(r) {
          if (r.counted) metrics.refused.labels(r.reason).inc()
          accessLog?.write({ time: Date.now(), ip: r.ip, method: r.method, path: r.path, status: r.status, bytes: r.bytes, reason: r.reason, durationMs: 0, upstreamMs: null })
        },
        refusedDuring(x, reason) {
          // A request that went upstream is not a refusal; its body's timeout is counted as a slow body either way.
          if (reason === 'ERR_HTTP_REQUEST_TIMEOUT') (x.forwarded ? bodies.slowStreamed : bodies.slowBuffered).inc()
          if (!x.forwarded) metrics.refused.labels(reason).inc()
        },
        inFlight: () => inFlight,
        drained: () => exit(),
      },
      log,
    )

    /** After the drain: the last access-log lines, leases and statistics go out (waiting at most 1 s), then `closed`. */
    const exit = (): void => {
      accessLog?.flush()
      log.info('drained, exiting')
      limiter.releaseAll() // tokens in hand go back before the connection closes
      closeRedis(redis)
      // The last statistics reach the primary before the worker goes.
      const sent = Promise.all([dispatcher.close(), new Promise<void>((r) => sendStats(r))])
      void Promise.race([sent, new Promise((r) => setTimeout(r, 1_000).unref())]).finally(() => this.#resolveClosed())
    }

    /** Enforces `next`; the leases of a kept rule whose generation changed (a reset) are dropped: nothing counts them now. */
    const useRules = (next: RuleSet): void => {
      const before = new Map(limiter.rules.rules.map((r) => [r.name, r.prefix]))
      limiter.replaceRules(next)
      for (const r of next.rules) {
        const old = before.get(r.name)
        if (old !== undefined && old !== r.prefix) limiter.forget(old, null)
      }
    }

    const fromPrimary: Handlers<ToWorker> = {
      'lease-grant': (msg) => primaryPool.deliver(msg),
      'cache-purge': (msg) => cache?.dropLocal(msg.purge),
      drain: () => server.drain('primary asked'),
      'limits-reset': (msg) => {
        if (msg.bucket !== null) return limiter.forget(msg.rule, msg.bucket)
        useRules(limiter.rules.withGenerations({ ...limiter.rules.generations, [msg.rule]: msg.generation }))
      },
      'set-rules': (msg) => {
        useRules(new RuleSet(msg.limits, msg.allow, msg.deny, msg.version, { ipv6Prefix: config.limitIpv6Prefix, generations: msg.generations }))
        log.info('rules replaced', { version: msg.version, rules: msg.limits.length })
      },
    }
    process.on('message', (msg: unknown) => dispatch(fromPrimary, msg))
    this.#server = server
  }

  /** Listens on the proxy port (shared with the other workers); resolves once it does. */
  start(): Promise<void> {
    return this.#server.listen()
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
