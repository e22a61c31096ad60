import { Redis, type RedisOptions } from 'ioredis'
import type { Config } from '../config.js'
import type { Logger } from '../log.js'

/**
 * The one way meliproxy connects to Redis: standalone (--redis-url) or through Sentinel (--redis-sentinels).
 * The options are the fail-fast set from shared/STACK.md: a command never waits in an offline queue (callers fall
 * back instead of hanging, and nothing stale is replayed later), reconnects are quick, and `failoverDetector`
 * follows Sentinel's switch so no write lands on a demoted master (split-brain).
 */

/** True when the Config names a Redis. */
export function redisConfigured(config: Config): boolean {
  return config.redisUrl !== null || config.redisSentinels.length > 0
}

/**
 * Opens a fail-fast client, or returns null when no Redis is configured. `name` shows in CLIENT LIST.
 * Connection errors are logged at debug level: callers see failures as rejected commands and fall back.
 */
export function createRedis(config: Config, name: string, log: Logger, overrides: RedisOptions = {}): Redis | null {
  const client = open(config, name, overrides)
  if (client === null) return null
  client.on('error', (err: Error) => log.debug('redis error', { client: name, error: err.message }))
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

const closing = new WeakSet<Redis>()

/** Closes a client made by createRedis for good. */
export function closeRedis(client: Redis | null): void {
  if (client === null) return
  closing.add(client)
  client.disconnect()
}

function open(config: Config, name: string, overrides: RedisOptions): Redis | null {
  const common: RedisOptions = {
    connectionName: `meliproxy-${name}`,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: 1_000,
    retryStrategy: (attempt: number) => Math.min(attempt * 50, 250),
    lazyConnect: false,
    ...overrides,
  }
  if (config.redisSentinels.length > 0) {
    return new Redis({
      ...common,
      sentinels: config.redisSentinels.map((s) => ({ host: s.host, port: s.port })),
      name: config.redisMaster,
      password: config.redisPassword ?? undefined,
      failoverDetector: true,
      disconnectTimeout: 100,
      sentinelRetryStrategy: (attempt: number) => Math.min(attempt * 100, 1_000),
    })
  }
  if (config.redisUrl !== null) {
    return new Redis(config.redisUrl, config.redisPassword === null ? common : { ...common, password: config.redisPassword })
  }
  return null
}
