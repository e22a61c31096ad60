import type { TierOptions } from './cache/tiers.js'
import type { CacheOptions } from './cache/http-cache.js'
import type { Config } from './config.js'
import type { KeyOptions } from './limiter/rules.js'
import type { BodyOptions } from './pipeline/body.js'
import type { GuardOptions } from './pipeline/guard.js'
import type { UpstreamOptions } from './pipeline/upstream.js'
import type { BreakerOptions } from './proxy/breaker.js'
import type { UpstreamTimeouts } from './proxy/upstream-dispatcher.js'
import type { ProxyServerOptions } from './proxy/server.js'
import type { RedisConnection } from './redis/client.js'
import type { StatsOptions } from './stats/service.js'

/**
 * The edge between the one validated Config (src/config.ts: flags, environment, file) and the parts: each part is
 * handed its own small frozen options object, built here, and never sees the rest of the Config.
 */

/** The named fields of a Config, as a new frozen object. */
function pick<K extends keyof Config>(config: Config, keys: readonly K[]): Readonly<Pick<Config, K>> {
  const out = {} as Pick<Config, K>
  for (const k of keys) out[k] = config[k]
  return Object.freeze(out)
}

export function redisConnection(config: Config): RedisConnection {
  return pick(config, ['redisUrl', 'redisSentinels', 'redisMaster', 'redisCluster', 'redisPassword', 'redisTls'])
}

export function serverOptions(config: Config): ProxyServerOptions {
  return pick(config, ['port', 'host', 'maxHeaderSize', 'clientHeadersTimeout', 'clientRequestTimeout', 'clientKeepaliveTimeout', 'maxConnections', 'drainTimeout'])
}

export function guardOptions(config: Config): GuardOptions {
  return pick(config, ['maxUrlLength', 'maxBodySize', 'headersWithUnderscores'])
}

export function bodyOptions(config: Config): BodyOptions {
  return pick(config, ['requestBuffering', 'maxBodySize'])
}

export function upstreamOptions(config: Config): UpstreamOptions {
  return pick(config, ['upstream', 'maxBodySize', 'headersWithUnderscores'])
}

export function statsOptions(config: Config): StatsOptions {
  return pick(config, ['stats', 'statsRetention', 'statsRollupRetention'])
}

export function upstreamTimeouts(config: Config): UpstreamTimeouts {
  return Object.freeze({ connect: config.connectTimeout, headers: config.headersTimeout, body: config.bodyTimeout })
}

export function breakerOptions(config: Config): BreakerOptions {
  return Object.freeze({
    failures: config.breakerFailures,
    errorRatio: config.breakerErrorRatio,
    windowMs: config.breakerWindow,
    minRequests: config.breakerMinRequests,
    openMs: config.breakerOpenTime,
  })
}

export function tierOptions(config: Config): TierOptions {
  return Object.freeze({ l1Bytes: config.cacheL1Size, l2TtlCapMs: config.cacheL2TtlCap })
}

/** `leaseMs`: how long a miss lease lasts (the worker's constant). */
export function cacheOptions(config: Config, leaseMs: number): CacheOptions {
  const targeted = config.cacheTargetedField === null ? ['cdn-cache-control'] : [config.cacheTargetedField, 'cdn-cache-control']
  return Object.freeze({
    origin: config.upstream,
    maxObjectBytes: config.cacheMaxObject,
    rules: config.cacheRules,
    targetedFields: Object.freeze(targeted),
    leaseMs,
  })
}

export function keyOptions(config: Config): KeyOptions {
  return Object.freeze({ ipv6Prefix: config.limitIpv6Prefix })
}
