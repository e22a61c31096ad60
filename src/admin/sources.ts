import { redisMode } from '../redis/client.js'
import { askAny, isCluster, type RedisClient } from '../redis/cluster.js'
import type { PurgeHub } from '../cache/purge-hub.js'
import type { Supervisor } from '../cluster/supervisor.js'
import { isLoopback, type Config } from '../config.js'
import { leaseFigures } from '../limiter/metrics.js'
import type { RulesController } from '../limiter/rules-controller.js'
import type { BreakerBoard } from '../proxy/breaker-board.js'
import type { StatsService } from '../stats/service.js'
import type { AdminSources, Readiness } from './server.js'

/** What the primary's parts are, for the admin API. */
export interface PrimaryParts {
  readonly config: () => Config
  readonly version: string
  readonly startedAt: number
  readonly supervisor: Supervisor
  readonly redis: RedisClient | null
  readonly breakers: BreakerBoard
  readonly rules: RulesController
  readonly stats: StatsService
  readonly purges: PurgeHub
  /** The workers' metrics (prom-client's cluster protocol) and the primary's own. */
  readonly aggregator: { clusterMetrics(): Promise<string> }
  readonly registry: { metrics(): Promise<string>; readonly contentType: string }
}

/** Resolves to `fallback` if `p` has not settled within `ms`. */
function within<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([p, new Promise<T>((r) => (timer = setTimeout(() => r(fallback), ms)))]).finally(() => clearTimeout(timer))
}

/** The admin API's view of the primary: readiness, metrics, status and the actions it offers. */
export function adminSources(parts: PrimaryParts): AdminSources {
  const { supervisor, redis, breakers, rules } = parts

  async function readiness(): Promise<Readiness> {
    const listening = supervisor.listening
    const reasons: string[] = []
    if (supervisor.stopping) reasons.push('shutting down')
    if (listening === 0) reasons.push('no worker is listening')
    let redisState: Readiness['redis'] = 'not configured'
    if (redis !== null) {
      const ping = redis.ping().then(
        () => 'ok' as const,
        () => 'unreachable' as const,
      )
      redisState = await within(ping, 500, 'unreachable' as const)
    }
    // Readiness means "this instance can serve". Redis and the upstream are shared by every instance: their trouble
    // is reported here, never a reason to leave the load balancer (that would take every instance out at once, while
    // each keeps serving without Redis and answers fast while the upstream is away).
    return {
      ready: reasons.length === 0,
      reasons,
      workers: { listening, desired: parts.config().workers },
      redis: redisState,
      upstreamBreaker: breakers.worstUpstream(),
      openRoutes: breakers.openRoutes(),
    }
  }

  /** The workers' lease figures; null when they do not all answer within 500 ms (e.g. while workers crash-loop). */
  async function limiterFigures(): Promise<ReturnType<typeof leaseFigures> | null> {
    const text = await within(parts.aggregator.clusterMetrics().catch(() => null), 500, null)
    return text === null ? null : leaseFigures(text)
  }

  async function redisRole(): Promise<string | null> {
    if (redis === null || redis.status !== 'ready' || isCluster(redis)) return null
    const role = (await within(redis.role().catch(() => null), 500, null)) as unknown[] | null
    return role === null ? null : String(role[0])
  }

  /** A cluster's state (CLUSTER INFO's cluster_state) and the masters this instance sees, with their connections' state. */
  async function clusterView(): Promise<Record<string, unknown>> {
    if (redis === null || !isCluster(redis)) return {}
    // Asked of a node that answers: the cluster client sends it to a random master, perhaps the one that is down.
    const ask = () => askAny(redis.nodes('all'), (n) => n.cluster('INFO')).catch(() => null)
    const info = redis.status === 'ready' ? await within(ask(), 500, null) : null
    const state = info === null ? null : (/cluster_state:(\w+)/.exec(String(info))?.[1] ?? null)
    const masters = redis.nodes('master').map((n) => ({ address: `${n.options.host}:${n.options.port}`, state: n.status }))
    masters.sort((a, b) => a.address.localeCompare(b.address))
    return { clusterState: state, masters }
  }

  async function status(): Promise<Record<string, unknown>> {
    const config = parts.config()
    const rs = rules.current
    return {
      version: parts.version,
      pid: process.pid,
      startedAt: new Date(parts.startedAt).toISOString(),
      uptimeSeconds: Math.round((Date.now() - parts.startedAt) / 1000),
      upstream: config.upstream,
      workers: {
        desired: config.workers,
        listening: supervisor.listening,
        restarts: supervisor.restarts,
        pids: supervisor.active().map((w) => w.worker.process.pid),
      },
      redis: {
        configured: redis !== null,
        mode: redisMode(config),
        state: redis?.status ?? 'none',
        role: await redisRole(),
        ...(await clusterView()),
      },
      limiter: await limiterFigures(),
      rules: { version: rs.version.version, source: rs.version.source, updatedAt: rs.version.updatedAt, count: rs.limits.length },
      stats: parts.stats.figures(),
      cache: { enabled: config.cache },
      upstreamBreaker: { state: breakers.worstUpstream(), workers: breakers.perWorker().upstream },
      routeBreakers: { open: breakers.openRoutes(), workers: breakers.perWorker().routes },
    }
  }

  return {
    readiness,
    status,
    async metrics() {
      const [cluster, own] = await Promise.all([parts.aggregator.clusterMetrics(), parts.registry.metrics()])
      return { contentType: parts.registry.contentType, body: cluster + own }
    },
    purgeCache: (glob) => parts.purges.purgeGlob(parts.config().upstream, glob),
    stats: (q) => parts.stats.query(q),
    limits: () => rules.current.version,
    putLimits: (doc, source) => rules.put(doc, source),
    limitsHistory: () => rules.history(),
    resetLimit: (rule, values) => rules.reset(rule, values),
    get adminToken() {
      return parts.config().adminToken // read on each call: a SIGHUP may change it
    },
    get tokenForReads() {
      return !isLoopback(parts.config().adminHost)
    },
  }
}
