import { readFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { extname } from 'node:path'
import { parse as parseYaml } from 'yaml'
import { ConfigError } from './errors.js'
import { LOG_LEVELS, type LogLevel } from './log.js'
import { BadValue, bool, bytes, duration, headerName, list, oneOf, ratio, RETENTION, text, TIMEOUT, wholeNumber } from './values.js'
import type { CacheRule } from './cache/types.js'
import { compilePathGlob } from './limiter/glob.js'
import { parseIpList, parseRules } from './limiter/spec.js'
import type { RuleSpec } from './limiter/types.js'
import { parseCidr, type Cidr } from './net/ip.js'
import type { UnderscoreAction } from './proxy/guard.js'
import { parseRoutePatterns } from './stats/routes.js'

/**
 * The one place that turns flags, environment and the config file into a validated, frozen Config.
 * Precedence: flag > environment (MELIPROXY_*) > config file > default.
 */

/** A Redis Sentinel or Redis Cluster node address. */
export interface HostPort {
  readonly host: string
  readonly port: number
}

/** The whole validated configuration, deep-frozen. */
export interface Config {
  readonly configFile: string | null
  readonly port: number
  readonly host: string
  readonly upstream: string
  readonly workers: number
  readonly adminPort: number
  readonly adminHost: string
  readonly adminToken: string | null
  readonly redisUrl: string | null
  readonly redisSentinels: readonly HostPort[]
  /** Redis Cluster seed nodes (any few of the cluster's nodes; the rest are discovered). */
  readonly redisCluster: readonly HostPort[]
  readonly redisMaster: string
  readonly redisPassword: string | null
  /** TLS to every Redis Cluster node (a standalone Redis takes rediss:// instead). */
  readonly redisTls: boolean
  readonly trustProxy: readonly Cidr[]
  readonly logLevel: LogLevel
  readonly accessLog: boolean
  readonly connectTimeout: number
  readonly headersTimeout: number
  readonly bodyTimeout: number
  readonly drainTimeout: number
  readonly shutdownDelay: number
  readonly instances: number
  readonly limiterTimeout: number
  /** `per: ip` keys an IPv6 client by its network of this many bits. */
  readonly limitIpv6Prefix: number
  /** Rate-limit rules (file or admin API only). */
  readonly limits: readonly RuleSpec[]
  /** Clients exempt from every limit. */
  readonly allow: readonly Cidr[]
  /** Clients refused with 403. */
  readonly deny: readonly Cidr[]
  readonly cache: boolean
  readonly cacheMaxObject: number
  readonly cacheL1Size: number
  readonly cacheL2TtlCap: number
  /** A targeted cache-control field of the operator's (lowercase), honoured before CDN-Cache-Control. */
  readonly cacheTargetedField: string | null
  /** Per-path-pattern cache overrides (file only). */
  readonly cacheRules: readonly CacheRule[]
  readonly breakerFailures: number
  readonly breakerErrorRatio: number
  readonly breakerWindow: number
  readonly breakerMinRequests: number
  readonly breakerOpenTime: number
  readonly retries: number
  readonly retryBudget: number
  readonly maxBodySize: number
  readonly maxUrlLength: number
  readonly maxHeaderSize: number
  readonly clientHeadersTimeout: number
  readonly clientRequestTimeout: number
  /** How long an idle client connection is kept open between requests. */
  readonly clientKeepaliveTimeout: number
  readonly maxConnections: number
  readonly headersWithUnderscores: UnderscoreAction
  /** Request bodies up to this size are read whole before the upstream request opens (0: every body streams). */
  readonly requestBuffering: number
  /** A streamed request body slower than this (bytes a second) is ended with 408 (0: no minimum). */
  readonly requestBodyMinRate: number
  readonly stats: boolean
  readonly statsRetention: number
  readonly statsRollupRetention: number
  /** Route patterns for statistics (file only). */
  readonly statsRoutes: readonly string[]
}

type Parser<T> = (raw: unknown) => T

/** One option: its key in the file, its flag, its environment variable, default, parser and help. */
export interface OptionSpec {
  readonly key: keyof Config
  readonly flags: string
  readonly env: string
  readonly help: string
  readonly defaultText: string
  readonly fileKey: boolean
}

const integer =
  (min: number, max: number, what: string): Parser<number> =>
  (raw) =>
    wholeNumber(raw, min, max, what)
const port = integer(1, 65535, 'a port')
const portOrZero = integer(0, 65535, 'a port')
const timeout: Parser<number> = (raw) => duration(raw, TIMEOUT)
const retention: Parser<number> = (raw) => duration(raw, RETENTION)

/** A duration that may be 0 (`0` turns the thing off). */
function durationOrZero(raw: unknown): number {
  return text(raw) === '0' ? 0 : duration(raw, TIMEOUT)
}

function cacheRules(raw: unknown): CacheRule[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) throw new ConfigError('cacheRules', 'must be a list of { path, ttl } or { path, bypass: true }')
  return raw.map((r: unknown, i) => {
    const at = `cacheRules[${i}]`
    if (typeof r !== 'object' || r === null || Array.isArray(r)) throw new ConfigError(at, 'must be a mapping')
    const rule = r as Record<string, unknown>
    for (const k of Object.keys(rule)) {
      if (!['path', 'ttl', 'bypass'].includes(k)) throw new ConfigError(`${at}.${k}`, 'unknown field (expected path, ttl, bypass)')
    }
    if (typeof rule.path !== 'string') throw new ConfigError(`${at}.path`, 'is required (a path glob)')
    const re = compilePathGlob(rule.path)
    if (typeof re === 'string') throw new ConfigError(`${at}.path`, re)
    if (rule.bypass !== undefined && typeof rule.bypass !== 'boolean') throw new ConfigError(`${at}.bypass`, 'must be true or false')
    if (rule.ttl === undefined && rule.bypass !== true) throw new ConfigError(at, 'needs ttl or bypass: true')
    let ttlMs: number | undefined
    if (rule.ttl !== undefined) {
      try {
        ttlMs = duration(rule.ttl, TIMEOUT)
      } catch (err) {
        throw new ConfigError(`${at}.ttl`, (err as Error).message)
      }
    }
    return { path: rule.path, ...(ttlMs !== undefined ? { ttlMs } : {}), ...(rule.bypass === true ? { bypass: true } : {}) }
  })
}

function httpUrl(raw: unknown): string {
  const s = text(raw)
  let url: URL
  try {
    url = new URL(s)
  } catch {
    throw new BadValue(`"${s}" is not a URL`)
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new BadValue(`"${s}" must be http:// or https://`)
  if (url.pathname !== '/' || url.search || url.hash || url.username) {
    throw new BadValue(`"${s}" must be an origin only (scheme, host, port)`)
  }
  return url.origin
}

function redisUrl(raw: unknown): string | null {
  const s = text(raw)
  if (s === '') return null
  let url: URL
  try {
    url = new URL(s)
  } catch {
    throw new BadValue(`"${s}" is not a URL`)
  }
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') throw new BadValue(`"${s}" must be redis:// or rediss://`)
  return s
}

function hostPorts(raw: unknown): HostPort[] {
  return list(raw).map((item) => {
    const m = /^(.+):(\d+)$/.exec(item)
    if (!m) throw new BadValue(`"${item}" is not host:port`)
    return { host: m[1]!.replace(/^\[|\]$/g, ''), port: port(m[2]) }
  })
}

function cidrs(raw: unknown): Cidr[] {
  return list(raw).map((item) => {
    const c = parseCidr(item)
    if (typeof c === 'string') throw new BadValue(c)
    return c
  })
}

function nonEmpty(raw: unknown): string {
  const s = text(raw)
  if (s === '') throw new BadValue('must not be empty')
  return s
}

/** A header field name, or none (empty). */
function optionalHeaderName(raw: unknown): string | null {
  return text(raw) === '' ? null : headerName(raw)
}

function optionalSecret(raw: unknown): string | null {
  const s = text(raw)
  return s === '' ? null : s
}

const logLevel: Parser<LogLevel> = (raw) => oneOf(raw, LOG_LEVELS)
const UNDERSCORE_ACTIONS: readonly UnderscoreAction[] = ['allow', 'drop', 'reject']
const underscoreAction: Parser<UnderscoreAction> = (raw) => oneOf(raw, UNDERSCORE_ACTIONS)

interface Option<T> extends OptionSpec {
  readonly parse: Parser<T>
  readonly default: T
}

function opt<T>(
  key: keyof Config,
  flags: string,
  help: string,
  parse: Parser<T>,
  def: T,
  defaultText = def === null ? 'none' : String(def),
): Option<T> {
  const env = 'MELIPROXY_' + key.replace(/[A-Z]/g, (c) => '_' + c).toUpperCase()
  return { key, flags, env, help, parse, default: def, defaultText, fileKey: key !== 'configFile' }
}

/** Every option, in --help order. The file uses the same camelCase keys. */
export const OPTIONS: readonly Option<unknown>[] = [
  opt('port', '-p, --port <n>', 'proxy listening port', port, 8080),
  opt('host', '--host <addr>', 'proxy listening address', nonEmpty, '0.0.0.0'),
  opt('upstream', '-u, --upstream <url>', 'upstream origin every request is forwarded to', httpUrl, 'https://api.mercadolibre.com'),
  opt('workers', '-w, --workers <n>', 'worker processes', integer(1, 256, 'a worker count'), availableParallelism(), 'CPU count'),
  opt('configFile', '-c, --config <file>', 'config file (YAML, or JSON by .json extension)', nonEmpty, null),
  opt('adminPort', '--admin-port <n>', 'admin listener port (health, metrics)', portOrZero, 9090),
  opt('adminHost', '--admin-host <addr>', 'admin listener address', nonEmpty, '127.0.0.1'),
  opt('adminToken', '--admin-token <token>', 'bearer token for the admin API', optionalSecret, null),
  opt('redisUrl', '--redis-url <url>', 'standalone Redis, redis://[:password@]host:port[/db]', redisUrl, null),
  opt('redisSentinels', '--redis-sentinels <host:port,...>', 'Redis Sentinel addresses', hostPorts, [], 'none'),
  opt('redisCluster', '--redis-cluster <host:port,...>', 'Redis Cluster seed nodes (the others are discovered)', hostPorts, [], 'none'),
  opt('redisMaster', '--redis-master <name>', 'Sentinel master name', nonEmpty, 'mymaster'),
  opt('redisPassword', '--redis-password <pw>', 'Redis password', optionalSecret, null),
  opt('redisTls', '--redis-tls', 'connect to the Redis Cluster nodes over TLS (standalone: use rediss://)', bool, false),
  opt('trustProxy', '--trust-proxy <cidr,...>', 'peers whose X-Forwarded-For is believed', cidrs, [], 'none'),
  opt('logLevel', '--log-level <level>', `log level: ${LOG_LEVELS.join(', ')}`, logLevel, 'info'),
  opt('accessLog', '--no-access-log', 'turn off the JSON access log on stdout', bool, true),
  opt('connectTimeout', '--connect-timeout <duration>', 'upstream connect timeout', timeout, 5000, '5s'),
  opt('headersTimeout', '--headers-timeout <duration>', 'upstream response headers timeout (504 after)', timeout, 30_000, '30s'),
  opt('bodyTimeout', '--body-timeout <duration>', 'upstream body idle timeout', timeout, 30_000, '30s'),
  opt('drainTimeout', '--drain-timeout <duration>', 'how long in-flight requests may run on shutdown', timeout, 30_000, '30s'),
  opt('shutdownDelay', '--shutdown-delay <duration>', 'on SIGTERM, keep serving this long with /readyz failing before draining', durationOrZero, 0, '0'),
  opt('instances', '--instances <n>', 'instances sharing the limits: while Redis is down each enforces limit/n', integer(1, 10_000, 'an instance count'), 1),
  opt('limiterTimeout', '--limiter-timeout <duration>', 'how long a limiter call to Redis may take before the local fallback decides', timeout, 100, '100ms'),
  opt('limitIpv6Prefix', '--limit-ipv6-prefix <bits>', 'per: ip counts an IPv6 client by its network of this many bits (IPv4: the address)', integer(1, 128, 'a prefix length'), 64),
  opt('cache', '--no-cache', 'turn off the HTTP cache', bool, true),
  opt('cacheMaxObject', '--cache-max-object <bytes>', 'largest response body stored; larger ones stream through', bytes, 1024 ** 2, '1mb'),
  opt('cacheL1Size', '--cache-l1-size <bytes>', 'in-process L1 cache size per worker (0 turns L1 off)', bytes, 64 * 1024 ** 2, '64mb'),
  opt('cacheL2TtlCap', '--cache-l2-ttl-cap <duration>', 'longest time an entry lives in L2 (Redis)', timeout, 3_600_000, '1h'),
  opt('cacheTargetedField', '--cache-targeted-field <name>', 'a targeted cache-control field of yours (e.g. Meliproxy-Cache-Control), honoured before CDN-Cache-Control and Cache-Control (RFC 9213)', optionalHeaderName, null),
  opt('maxBodySize', '--max-body-size <bytes>', 'largest request body accepted (413 above)', bytes, 10 * 1024 ** 2, '10mb'),
  opt('maxUrlLength', '--max-url-length <n>', 'longest request target accepted (414 above)', integer(64, 65_536, 'a length'), 8192),
  opt('maxHeaderSize', '--max-header-size <bytes>', 'largest request line plus headers accepted (431 above)', bytes, 16 * 1024, '16kb'),
  opt('clientHeadersTimeout', '--client-headers-timeout <duration>', 'time a client has to send its request headers (408 after)', timeout, 10_000, '10s'),
  opt('clientRequestTimeout', '--client-request-timeout <duration>', 'time a client has to send its whole request (408 after)', timeout, 120_000, '2m'),
  opt('clientKeepaliveTimeout', '--client-keepalive-timeout <duration>', 'how long an idle client connection stays open between requests (as nginx keepalive_timeout); behind a load balancer, longer than its idle timeout', timeout, 75_000, '75s'),
  opt('maxConnections', '--max-connections <n>', 'open client connections per worker; more are closed at once', integer(1, 1_000_000, 'a count'), 10_000),
  opt('headersWithUnderscores', '--headers-with-underscores <action>', 'request header names with "_": drop (as nginx), allow (forward: a smuggling risk with CGI/WSGI/PHP back ends), or reject (400)', underscoreAction, 'drop'),
  opt('requestBuffering', '--request-buffering <bytes>', 'request bodies up to this size are read whole before the upstream request opens (0: stream every body)', bytes, 64 * 1024, '64kb'),
  opt('requestBodyMinRate', '--request-body-min-rate <bytes>', 'bytes a second, over 5 s windows, a streamed request body must arrive at (408 below; 0: no minimum)', bytes, 1024, '1kb'),
  opt('breakerFailures', '--breaker-failures <n>', 'consecutive upstream failures that open the circuit breaker (0: no breaker)', integer(0, 10_000, 'a count'), 5),
  opt('breakerErrorRatio', '--breaker-error-ratio <r>', 'failure ratio over the breaker window that opens it', ratio, 0.5),
  opt('breakerWindow', '--breaker-window <duration>', 'window of the failure ratio', timeout, 10_000, '10s'),
  opt('breakerMinRequests', '--breaker-min-requests <n>', 'requests in the window before the ratio counts', integer(1, 1_000_000, 'a count'), 20),
  opt('breakerOpenTime', '--breaker-open-time <duration>', 'how long the breaker stays open before a probe', timeout, 5_000, '5s'),
  opt('retries', '--retries <n>', 'retries of an idempotent body-less request after a connection failure', integer(0, 5, 'a count'), 1),
  opt('retryBudget', '--retry-budget <r>', 'retries as a share of requests, at most', ratio, 0.2),
  opt('stats', '--no-stats', 'turn off usage statistics (the /api/stats store)', bool, true),
  opt('statsRetention', '--stats-retention <duration>', 'how long per-minute statistics are kept', retention, 48 * 3_600_000, '48h'),
  opt('statsRollupRetention', '--stats-rollup-retention <duration>', 'how long hourly statistics are kept', retention, 30 * 86_400_000, '30d'),
]

/** Config-file sections that have no flag: validated by their own parsers. */
const FILE_SECTIONS = {
  limits: (raw: unknown) => parseRules(raw),
  allow: (raw: unknown) => parseIpList(raw, 'allow'),
  deny: (raw: unknown) => parseIpList(raw, 'deny'),
  cacheRules,
  statsRoutes: (raw: unknown) => parseRoutePatterns(raw),
} as const

/** What the edge hands to loadConfig: flag values given on the command line, and the environment. */
export interface ConfigSources {
  readonly flags: Readonly<Record<string, unknown>>
  readonly env: Readonly<Record<string, string | undefined>>
}

function readConfigFile(path: string): Record<string, unknown> {
  let body: string
  try {
    body = readFileSync(path, 'utf8')
  } catch (err) {
    throw new ConfigError('--config', `cannot read "${path}": ${(err as NodeJS.ErrnoException).code ?? String(err)}`)
  }
  let doc: unknown
  try {
    doc = extname(path) === '.json' ? JSON.parse(body) : parseYaml(body)
  } catch (err) {
    const first = String((err as Error).message).split('\n')[0]
    throw new ConfigError('--config', `"${path}" is not valid ${extname(path) === '.json' ? 'JSON' : 'YAML'}: ${first}`)
  }
  if (doc === null || doc === undefined) return {}
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new ConfigError('--config', `"${path}" must hold a mapping of options`)
  const known = new Set([...OPTIONS.filter((o) => o.fileKey).map((o) => o.key as string), ...Object.keys(FILE_SECTIONS)])
  for (const key of Object.keys(doc)) {
    if (!known.has(key)) throw new ConfigError(key, `unknown key in "${path}"`)
  }
  return doc as Record<string, unknown>
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host)
}

/** Freezes a value and everything it holds (a Config, and every Config derived from one). */
export function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value)
    for (const v of Object.values(value)) deepFreeze(v)
  }
  return value
}

/** Builds the Config from flags, environment, file and defaults; throws ConfigError naming the field and value. */
export function loadConfig(sources: ConfigSources): Config {
  const { flags, env } = sources
  const fileOpt = OPTIONS.find((o) => o.key === 'configFile')!
  const filePath = (flags.configFile ?? env[fileOpt.env]) as string | undefined
  const file = filePath ? readConfigFile(filePath) : {}
  const out: Record<string, unknown> = {}
  for (const o of OPTIONS) {
    // Every source that sets the option is validated, even one a higher source overrides: a bad value in the
    // file is an error today, not a surprise on the day the flag is removed. The first present source wins.
    const present: [raw: unknown, field: string][] = []
    if (flags[o.key] !== undefined) present.push([flags[o.key], o.flags.replace(/^-\w, /, '').split(' ')[0]!.replace('--no-', '--')])
    if (env[o.env] !== undefined) present.push([env[o.env], o.env])
    if (o.fileKey && file[o.key] !== undefined) present.push([file[o.key], `${o.key} (in ${filePath})`])
    out[o.key] = o.default
    for (let i = present.length - 1; i >= 0; i--) {
      const [raw, field] = present[i]!
      try {
        out[o.key] = o.parse(raw)
      } catch (err) {
        if (err instanceof BadValue) throw new ConfigError(field, err.message)
        throw err
      }
    }
  }
  for (const [key, parse] of Object.entries(FILE_SECTIONS)) out[key] = parse(file[key])
  const config = out as unknown as Config
  if (config.adminToken === null && !isLoopback(config.adminHost)) {
    throw new ConfigError('--admin-host', `"${config.adminHost}" is not a loopback address: an admin listener there needs --admin-token`)
  }
  if (config.clientHeadersTimeout > config.clientRequestTimeout) {
    throw new ConfigError('--client-headers-timeout', 'must not be longer than --client-request-timeout')
  }
  const redisTopologies = [
    config.redisUrl !== null && '--redis-url',
    config.redisSentinels.length > 0 && '--redis-sentinels',
    config.redisCluster.length > 0 && '--redis-cluster',
  ].filter((f): f is string => f !== false)
  if (redisTopologies.length > 1) {
    throw new ConfigError(redisTopologies.join(' and '), 'give only one of --redis-url, --redis-sentinels, --redis-cluster')
  }
  if (config.redisTls && config.redisCluster.length === 0) {
    throw new ConfigError('--redis-tls', 'applies to --redis-cluster only (a standalone Redis takes a rediss:// URL)')
  }
  return deepFreeze(config)
}

/** Serialises a Config for a worker (the primary passes it through the fork environment). */
export function encodeConfig(config: Config): string {
  return JSON.stringify(config)
}

/** The variable that carries the encoded Config to a forked worker. */
export const WORKER_CONFIG_ENV = 'MELIPROXY_WORKER_CONFIG'

/** Reads the Config the primary passed to this worker; it was validated there. */
export function workerConfigFromEnv(env: Readonly<Record<string, string | undefined>>): Config {
  const encoded = env[WORKER_CONFIG_ENV]
  if (!encoded) throw new Error(`${WORKER_CONFIG_ENV} is not set: workers are started by the primary`)
  return deepFreeze(JSON.parse(encoded) as Config)
}
