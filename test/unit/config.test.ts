import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { loadConfig, OPTIONS } from '../../src/config.js'
import { duration, TIMEOUT } from '../../src/values.js'

const parseDuration = (raw: unknown): number => duration(raw, TIMEOUT)
import { ConfigError } from '../../src/errors.js'

const dir = mkdtempSync(join(tmpdir(), 'meliproxy-config-'))
const yaml = join(dir, 'c.yaml')
writeFileSync(yaml, 'port: 7000\nworkers: 3\nlogLevel: warn\nredisSentinels: [127.0.0.1:26379, "[::1]:26380"]\n')

t.test('precedence is flag > environment > file > default', async (t) => {
  const c = loadConfig({ flags: { configFile: yaml, port: '9000' }, env: { MELIPROXY_PORT: '8000', MELIPROXY_WORKERS: '5' } })
  t.equal(c.port, 9000, 'the flag wins over env and file')
  t.equal(c.workers, 5, 'env wins over the file')
  t.equal(c.logLevel, 'warn', 'the file wins over the default')
  t.equal(c.host, '0.0.0.0', 'the default fills the rest')
  t.same(c.redisSentinels, [{ host: '127.0.0.1', port: 26379 }, { host: '::1', port: 26380 }])
  t.ok(Object.isFrozen(c) && Object.isFrozen(c.redisSentinels[0]), 'the config is deep-frozen')
})

t.test('a JSON config file is read by its extension', async (t) => {
  const json = join(dir, 'c.json')
  writeFileSync(json, JSON.stringify({ upstream: 'http://127.0.0.1:1234', accessLog: false }))
  const c = loadConfig({ flags: { configFile: json }, env: {} })
  t.equal(c.upstream, 'http://127.0.0.1:1234')
  t.equal(c.accessLog, false)
})

t.test('the config file is also found through MELIPROXY_CONFIG_FILE', async (t) => {
  const c = loadConfig({ flags: {}, env: { MELIPROXY_CONFIG_FILE: yaml } })
  t.equal(c.port, 7000)
})

t.test('durations take ms, s, m and h', async (t) => {
  t.equal(parseDuration('250'), 250)
  t.equal(parseDuration('250ms'), 250)
  t.equal(parseDuration('1.5s'), 1500)
  t.equal(parseDuration('2m'), 120_000)
  t.equal(parseDuration('1h'), 3_600_000)
  t.throws(() => parseDuration('0s'))
  t.throws(() => parseDuration('5 minutes'))
})

t.test('redis-url and redis-sentinels together are refused', async (t) => {
  t.throws(
    () => loadConfig({ flags: { redisUrl: 'redis://127.0.0.1:6379', redisSentinels: '127.0.0.1:26379' }, env: {} }),
    ConfigError,
  )
})

t.test('exactly one Redis topology: any two of url, sentinels and cluster are refused, naming both', async (t) => {
  const url = 'redis://127.0.0.1:6379'
  const sentinels = '127.0.0.1:26379'
  const cluster = '127.0.0.1:7000,127.0.0.1:7001'
  t.throws(() => loadConfig({ flags: { redisUrl: url, redisCluster: cluster }, env: {} }), /^--redis-url and --redis-cluster: give only one of/)
  t.throws(() => loadConfig({ flags: { redisSentinels: sentinels }, env: { MELIPROXY_REDIS_CLUSTER: cluster } }), /^--redis-sentinels and --redis-cluster/)
  t.throws(() => loadConfig({ flags: { redisUrl: url, redisSentinels: sentinels, redisCluster: cluster }, env: {} }), /^--redis-url and --redis-sentinels and --redis-cluster/)
  const c = loadConfig({ flags: { redisCluster: cluster, redisTls: true, redisPassword: 'pw' }, env: {} })
  t.same(c.redisCluster, [{ host: '127.0.0.1', port: 7000 }, { host: '127.0.0.1', port: 7001 }])
  t.equal(c.redisTls, true)
  t.equal(c.redisUrl, null)
})

t.test('an overridden but invalid file value is still an error', async (t) => {
  const bad = join(dir, 'bad.yaml')
  writeFileSync(bad, 'port: 0\n')
  t.throws(() => loadConfig({ flags: { configFile: bad, port: '8080' }, env: {} }), /port \(in .*\): "0"/)
})

t.test('the example config file loads and documents every option', async (t) => {
  const example = new URL('../../config/meliproxy.example.yaml', import.meta.url).pathname
  const c = loadConfig({ flags: { configFile: example }, env: {} })
  t.equal(c.upstream, 'https://api.mercadolibre.com')
  const text = (await import('node:fs')).readFileSync(example, 'utf8')
  for (const o of OPTIONS) {
    if (o.key === 'configFile') continue
    t.match(text, new RegExp(`^#? ?${o.key}:`, 'm'), `${o.key} is documented`)
  }
})

t.test('request buffering, the body rate and header names with "_": defaults, sources, and bad values named', async (t) => {
  const d = loadConfig({ flags: {}, env: {} })
  t.equal(d.requestBuffering, 64 * 1024)
  t.equal(d.requestBodyMinRate, 1024)
  t.equal(d.headersWithUnderscores, 'drop')
  t.equal(loadConfig({ flags: { requestBuffering: '0' }, env: {} }).requestBuffering, 0, '0 streams every body')
  t.equal(loadConfig({ flags: {}, env: { MELIPROXY_REQUEST_BODY_MIN_RATE: '0' } }).requestBodyMinRate, 0)
  t.equal(loadConfig({ flags: {}, env: { MELIPROXY_HEADERS_WITH_UNDERSCORES: 'allow' } }).headersWithUnderscores, 'allow')
  const json = join(dir, 'edge.json')
  writeFileSync(json, JSON.stringify({ requestBuffering: '1mb' }))
  t.equal(loadConfig({ flags: { configFile: json }, env: {} }).requestBuffering, 1024 ** 2)
  t.throws(() => loadConfig({ flags: { requestBuffering: 'lots' }, env: {} }), /--request-buffering: "lots" is not a size/)
  t.throws(() => loadConfig({ flags: { requestBodyMinRate: '-1' }, env: {} }), /--request-body-min-rate/)
  t.throws(() => loadConfig({ flags: { headersWithUnderscores: 'keep' }, env: {} }), /--headers-with-underscores/)
})

t.test('limitIpv6Prefix is 64 by default, 1 to 128 from any source, and names the field when bad', async (t) => {
  t.equal(loadConfig({ flags: {}, env: {} }).limitIpv6Prefix, 64)
  t.equal(loadConfig({ flags: { limitIpv6Prefix: '48' }, env: {} }).limitIpv6Prefix, 48)
  t.equal(loadConfig({ flags: {}, env: { MELIPROXY_LIMIT_IPV6_PREFIX: '128' } }).limitIpv6Prefix, 128)
  const json = join(dir, 'v6.json')
  writeFileSync(json, JSON.stringify({ limitIpv6Prefix: 56 }))
  t.equal(loadConfig({ flags: { configFile: json }, env: {} }).limitIpv6Prefix, 56)
  t.throws(() => loadConfig({ flags: { limitIpv6Prefix: '0' }, env: {} }), /--limit-ipv6-prefix: "0" is not a prefix length \(1-128\)/)
  t.throws(() => loadConfig({ flags: {}, env: { MELIPROXY_LIMIT_IPV6_PREFIX: '129' } }), /MELIPROXY_LIMIT_IPV6_PREFIX/)
})
