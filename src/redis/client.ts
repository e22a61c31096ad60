import { Cluster, Redis, type ClusterOptions, type RedisOptions } from 'ioredis'
import type { Config } from '../config.js'
import type { Logger } from '../log.js'
import { isCluster, type RedisClient } from './cluster.js'

/**
 * The one way meliproxy connects to Redis: standalone (--redis-url), through Sentinel (--redis-sentinels) or to a
 * Redis Cluster (--redis-cluster). The options are the fail-fast set from shared/STACK.md: a command never waits in
 * an offline queue (callers fall back instead of hanging, and nothing stale is replayed later), reconnects are quick,
 * and `failoverDetector` follows Sentinel's switch so no write lands on a demoted master (split-brain). On a cluster
 * the same holds per command: a command whose connection closed is not sent again elsewhere (it may have applied),
 * it fails and the caller falls back; a MOVED redirect (never applied) is followed.
 */

/** The Redis part of the configuration (built at the edge, src/options.ts): one topology, its password and TLS. */
export type RedisConnection = Readonly<Pick<Config, 'redisUrl' | 'redisSentinels' | 'redisMaster' | 'redisCluster' | 'redisPassword' | 'redisTls'>>

/** How meliproxy reaches Redis. */
export type RedisMode = 'none' | 'standalone' | 'sentinel' | 'cluster'

/** The configured Redis topology. */
export function redisMode(config: RedisConnection): RedisMode {
  if (config.redisCluster.length > 0) return 'cluster'
  if (config.redisSentinels.length > 0) return 'sentinel'
  return config.redisUrl !== null ? 'standalone' : 'none'
}

/** True when a Redis is configured. */
export function redisConfigured(config: RedisConnection): boolean {
  return redisMode(config) !== 'none'
}

/**
 * Opens a fail-fast client, or returns null when no Redis is configured. `name` shows in CLIENT LIST.
 * Connection errors are logged at debug level: callers see failures as rejected commands and fall back.
 * `overrides` are connection options (for a cluster: each node's connection), except `enableOfflineQueue`, which
 * on a cluster is the cluster's own queue (used while it has no slot map yet).
 */
export function createRedis(config: RedisConnection, name: string, log: Logger, overrides: RedisOptions = {}): RedisClient | null {
  const client = open(config, name, overrides)
  return client === null ? null : watch(client, name, log)
}

/**
 * Opens the connection for pub/sub channels (a subscribed connection can do nothing else), or null without Redis.
 * Standalone and Sentinel: a client like createRedis's, with its offline queue on (a SUBSCRIBE made while it
 * connects waits for the connection). On a cluster: one plain connection to any node, since a cluster delivers a
 * classic PUBLISH to every node; when it fails, it reconnects to the next node known (the seeds, then the nodes
 * `main` has discovered). Not the cluster client's own subscriber: with every node down, ioredis 6 reselects it in a
 * tight loop that never backs off and leaks a listener per turn (the primary measured at 70% CPU and +120 MB in 10 s).
 */
export function createSubscriber(config: RedisConnection, name: string, log: Logger, main: RedisClient | null): Redis | null {
  if (main === null) return null
  if (!isCluster(main)) return createRedis(config, name, log, { enableOfflineQueue: true }) as Redis
  const seeds = config.redisCluster
  let turn = 0
  const client: Redis = new Redis({
    ...nodeOptions(config, common(name, { enableOfflineQueue: true })),
    host: seeds[0]!.host,
    port: seeds[0]!.port,
    retryStrategy: (attempt: number) => {
      // The connector reads host and port from these options on every connect: the next attempt goes to the next node.
      const known = [...seeds, ...main.nodes('all').map((n) => ({ host: n.options.host ?? '127.0.0.1', port: n.options.port ?? 6379 }))]
      const next = known[++turn % known.length]!
      client.options.host = next.host
      client.options.port = next.port
      return Math.min(attempt * 50, 250)
    },
  })
  return watch(client, name, log)
}

/** Logs a client's errors at debug level and connects it again should it end by itself. */
function watch<C extends RedisClient>(client: C, name: string, log: Logger): C {
  client.on('error', (err: Error) => log.debug('redis error', { client: name, error: err.message }))
  if (isCluster(client)) {
    client.on('node error', (err: Error, node: string) => log.debug('redis node error', { client: name, node, error: err.message }))
  }
  // ioredis 6 gives up for good ('end') when the failover detector fires while it is still reconnecting after a
  // dead master: the +switch-master message aborts the reconnect in progress. Nothing else of ours ends a client
  // except closeRedis(), so any other 'end' means connect again.
  client.on('end', () => {
    if (closing.has(client)) return
    log.warn('redis connection ended unexpectedly; reconnecting', { client: name })
    setTimeout(() => {
      if (!closing.has(client) && client.status === 'end') client.connect().catch(() => {})
    }, 100).unref()
  })
  return client
}

const closing = new WeakSet<RedisClient>()

/** Closes a client made by createRedis for good. */
export function closeRedis(client: RedisClient | null): void {
  if (client === null) return
  closing.add(client)
  client.disconnect()
}

/** The fail-fast connection options every client starts from. */
function common(name: string, overrides: RedisOptions): RedisOptions {
  return {
    connectionName: `meliproxy-${name}`,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: 1_000,
    retryStrategy: (attempt: number) => Math.min(attempt * 50, 250),
    lazyConnect: false,
    ...overrides,
  }
}

/** A cluster node's connection options: the common ones, the password, TLS. */
function nodeOptions(config: RedisConnection, options: RedisOptions): RedisOptions {
  return { ...options, password: config.redisPassword ?? undefined, ...(config.redisTls ? { tls: {} } : {}) }
}

function open(config: RedisConnection, name: string, overrides: RedisOptions): RedisClient | null {
  const options = common(name, overrides)
  if (config.redisCluster.length > 0) return openCluster(config, options)
  if (config.redisSentinels.length > 0) {
    return new Redis({
      ...options,
      sentinels: config.redisSentinels.map((s) => ({ host: s.host, port: s.port })),
      name: config.redisMaster,
      password: config.redisPassword ?? undefined,
      failoverDetector: true,
      disconnectTimeout: 100,
      sentinelRetryStrategy: (attempt: number) => Math.min(attempt * 100, 1_000),
    })
  }
  if (config.redisUrl !== null) {
    return new Redis(config.redisUrl, config.redisPassword === null ? options : { ...options, password: config.redisPassword })
  }
  return null
}

/** How often a cluster client reads the slot map again by itself (it also does on every MOVED). */
export const CLUSTER_SLOTS_REFRESH_MS = 1_000

function openCluster(config: RedisConnection, options: RedisOptions): Cluster {
  const { enableOfflineQueue, retryStrategy: _nodeRetry, lazyConnect, ...node } = options
  const clusterOptions: ClusterOptions = {
    // Each node's connection. ioredis keeps a node's own offline queue on (it queues while the node connects) and
    // never reconnects a lost node: it drops it and reads the slot map again, which names the promoted replica.
    redisOptions: nodeOptions(config, node),
    enableOfflineQueue,
    lazyConnect,
    // A command whose connection closed (a master killed mid-command) may have applied: sending it again to another
    // node (the default, after 100 ms, up to 16 times) could count a lease grant twice. Fail it; the caller falls
    // back. The same for CLUSTERDOWN (no master for the slot yet): fail now rather than queue until failover ends.
    retryDelayOnFailover: 0,
    retryDelayOnClusterDown: 0,
    // TRYAGAIN (a slot migrating, never applied) and MOVED are safe to follow, a few times at most.
    retryDelayOnTryAgain: 50,
    maxRedirections: 6,
    slotsRefreshTimeout: 1_000,
    slotsRefreshInterval: CLUSTER_SLOTS_REFRESH_MS,
    clusterRetryStrategy: (attempt: number) => Math.min(attempt * 50, 250),
    enableReadyCheck: true,
    scaleReads: 'master',
  }
  return new Cluster(
    config.redisCluster.map((s) => ({ host: s.host, port: s.port })),
    clusterOptions,
  )
}
