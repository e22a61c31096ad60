import { spawn, spawnSync } from 'node:child_process'
import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { binCommand, childPids, cleanEnv, runBinary, waitFor } from '../helpers/meliproxy.js'
import { freePort } from '../helpers/ports.js'

const dir = mkdtempSync(join(tmpdir(), 'meliproxy-cli-'))
const file = (name: string, body: string): string => {
  const p = join(dir, name)
  writeFileSync(p, body)
  return p
}

/** Each bad input, and what the one error line must name. */
const cases: { name: string; args: string[]; env?: Record<string, string>; names: RegExp }[] = [
  { name: 'a port out of range', args: ['--port', '70000'], names: /--port.*"70000"/ },
  { name: 'a port that is not a number', args: ['-p', 'eighty'], names: /--port.*"eighty"/ },
  { name: 'a malformed upstream URL', args: ['--upstream', 'not a url'], names: /--upstream.*"not a url"/ },
  { name: 'an upstream with a path', args: ['--upstream', 'http://x.test/api'], names: /--upstream.*origin/ },
  { name: 'a missing config file', args: ['--config', join(dir, 'absent.yaml')], names: /--config.*absent\.yaml.*ENOENT/ },
  { name: 'a YAML syntax error', args: ['--config', file('bad.yaml', 'port: [8080\nhost: x\n')], names: /--config.*bad\.yaml.*YAML/ },
  { name: 'an unknown key in the file', args: ['--config', file('unknown.yaml', 'prot: 8080\n')], names: /^meliproxy: prot: unknown key/ },
  { name: 'a bad value in the file', args: ['--config', file('val.yaml', 'workers: 0\n')], names: /workers \(in .*val\.yaml\).*"0"/ },
  { name: 'a bad environment value', args: [], env: { MELIPROXY_ADMIN_PORT: '-1' }, names: /MELIPROXY_ADMIN_PORT.*"-1"/ },
  { name: 'a bad trust-proxy CIDR', args: ['--trust-proxy', '10.0.0.0/33'], names: /--trust-proxy.*10\.0\.0\.0\/33/ },
  { name: 'a bad duration', args: ['--headers-timeout', 'soon'], names: /--headers-timeout.*"soon"/ },
  { name: 'a statistics retention without a unit', args: ['--stats-retention', '48'], names: /--stats-retention.*"48"/ },
  { name: 'a route pattern not starting with /', args: ['--config', file('routes.json', '{"statsRoutes":["items/:id"]}')], names: /statsRoutes\[0\].*items\/:id/ },
  { name: 'an IPv6 prefix above 128', args: ['--limit-ipv6-prefix', '129'], names: /--limit-ipv6-prefix.*"129"/ },
  { name: 'an IPv6 prefix of 0', args: [], env: { MELIPROXY_LIMIT_IPV6_PREFIX: '0' }, names: /MELIPROXY_LIMIT_IPV6_PREFIX.*"0"/ },
  { name: 'an IPv6 prefix in the file that is not a number', args: ['--config', file('v6.json', '{"limitIpv6Prefix":"/64"}')], names: /limitIpv6Prefix \(in .*v6\.json\).*"\/64"/ },
  { name: 'an unknown flag', args: ['--prot', '1'], names: /unknown option '--prot'/ },
  { name: 'two Redis topologies', args: ['--redis-url', 'redis://127.0.0.1:6379', '--redis-cluster', '127.0.0.1:7000'], names: /--redis-url and --redis-cluster: give only one of --redis-url, --redis-sentinels, --redis-cluster/ },
  { name: 'a cluster from the environment next to Sentinel in the file', args: ['--config', file('sentinels.yaml', 'redisSentinels: 127.0.0.1:26379\n')], env: { MELIPROXY_REDIS_CLUSTER: '127.0.0.1:7000,127.0.0.1:7001' }, names: /--redis-sentinels and --redis-cluster: give only one/ },
  { name: 'a cluster seed that is not host:port', args: ['--redis-cluster', '127.0.0.1'], names: /--redis-cluster.*"127\.0\.0\.1" is not host:port/ },
  { name: 'a cluster seed in the file with a bad port', args: ['--config', file('cluster.json', '{"redisCluster":["127.0.0.1:99999"]}')], names: /redisCluster \(in .*cluster\.json\).*"99999"/ },
  { name: 'TLS without a cluster', args: ['--redis-url', 'redis://127.0.0.1:6379', '--redis-tls'], names: /--redis-tls: applies to --redis-cluster only/ },
]

for (const c of cases) {
  t.test(`${c.name} exits 2 with one line naming the field and the value`, async (t) => {
    const r = await runBinary(c.args, c.env)
    t.equal(r.code, 2, 'exit code 2')
    const lines = r.stderr.trim().split('\n')
    t.equal(lines.length, 1, `one line: ${r.stderr.trim()}`)
    t.match(lines[0], c.names)
    t.notMatch(r.stderr, /\n\s+at /, 'no stack trace')
  })
}

t.test('--help documents every flag, its environment variable and the precedence', async (t) => {
  const r = await runBinary(['--help'])
  t.equal(r.code, 0)
  for (const flag of ['--port', '--host', '--upstream', '--workers', '--config', '--admin-port', '--admin-host',
    '--admin-token', '--redis-url', '--redis-sentinels', '--redis-cluster', '--redis-master', '--redis-password', '--redis-tls', '--trust-proxy',
    '--log-level', '--no-access-log', '--version']) {
    t.match(r.stdout, flag, `mentions ${flag}`)
  }
  t.match(r.stdout, /MELIPROXY_PORT/)
  t.match(r.stdout, /flag > environment > config file > default/)
})

t.test('--version prints the package version', async (t) => {
  const r = await runBinary(['--version'])
  t.equal(r.code, 0)
  t.match(r.stdout.trim(), /^\d+\.\d+\.\d+$/)
})

/** Bad rules, each refused at start with exit 2 and one line naming the rule and the field. */
const badRules: { name: string; limits: unknown; names: RegExp }[] = [
  { name: 'an unknown rule field', limits: [{ name: 'a', limit: 1, window: '1m', bursts: 2 }], names: /limits\[0\] \(a\)\.bursts: unknown field/ },
  { name: 'a burst without a token bucket', limits: [{ name: 'a', limit: 1, window: '1m', burst: 2 }], names: /limits\[0\] \(a\)\.burst: is only for algorithm: token-bucket/ },
  { name: 'a cost above the limit', limits: [{ name: 'c', limit: 10, window: '1m', cost: 11 }], names: /limits\[0\] \(c\)\.cost: 11 is above the limit 10/ },
  { name: 'an unknown whenRedisDown', limits: [{ name: 'w', limit: 10, window: '1m', whenRedisDown: 'maybe' }], names: /limits\[0\] \(w\)\.whenRedisDown: "maybe" is not one of local, allow, deny/ },
  { name: 'a bad glob', limits: [{ name: 'g', match: { path: 'items/*' }, limit: 1, window: '1m' }], names: /limits\[0\] \(g\)\.match\.path: "items\/\*" must start with \// },
  { name: 'a limit of 0', limits: [{ name: 'z', limit: 0, window: '1m' }], names: /limits\[0\] \(z\)\.limit: 0 is not a whole number above 0/ },
  { name: 'a bad CIDR', limits: [{ name: 'c', match: { ip: '10.0.0.0/40' }, limit: 1, window: '1m' }], names: /limits\[0\] \(c\)\.match\.ip: "10\.0\.0\.0\/40"/ },
  { name: 'a duplicate rule name', limits: [{ name: 'd', limit: 1, window: '1m' }, { name: 'd', limit: 2, window: '1m' }], names: /duplicate rule name "d"/ },
  { name: 'a bad window', limits: [{ name: 'w', limit: 1, window: '1 minute' }], names: /limits\[0\] \(w\)\.window: "1 minute" is not a window/ },
  { name: 'a bad per', limits: [{ name: 'p', per: ['country'], limit: 1, window: '1m' }], names: /limits\[0\] \(p\)\.per: "country"/ },
]

for (const c of badRules) {
  t.test(`${c.name} in the rules exits 2 naming the rule and the field`, async (t) => {
    const r = await runBinary(['--config', file(`${c.name.replace(/\W+/g, '-')}.json`, JSON.stringify({ limits: c.limits }))])
    t.equal(r.code, 2)
    const lines = r.stderr.trim().split('\n')
    t.equal(lines.length, 1, r.stderr.trim())
    t.match(lines[0], c.names)
  })
}

t.test('an address that can never be listened on: exit 2 before any worker starts, one line naming the flag and why', async (t) => {
  const free = await freePort()
  const cases: [string, string[], RegExp][] = [
    ['--host an address this machine does not have', ['--host', '192.0.2.1', '--port', String(free), '--admin-port', '0'], new RegExp(`^meliproxy: --port: cannot listen on 192\\.0\\.2\\.1:${free}: this machine has no such address \\(EADDRNOTAVAIL\\)$`)],
    ['--admin-host an address this machine does not have', ['--port', String(free), '--admin-host', '192.0.2.1', '--admin-token', 'x', '--admin-port', String(free)], new RegExp(`^meliproxy: --admin-port: cannot listen on 192\\.0\\.2\\.1:${free}: this machine has no such address \\(EADDRNOTAVAIL\\)$`)],
  ]
  for (const [name, args, line] of cases) {
    const r = await runBinary(['--workers', '1', ...args])
    t.equal(r.code, 2, `${name}: exit 2`)
    t.match(r.stderr.trim(), line, `${name}: ${r.stderr.trim()}`)
    t.notMatch(r.stdout + r.stderr, /worker/, `${name}: no worker was started`)
  }
  // A port below 1024 without the capability (EACCES) is the same case: the package test checks it under systemd, as
  // the unprivileged user. A port in use is not: its holder may leave, and the workers retry (crash.test.ts).
})

t.test('the admin listener on the proxy\'s own port: exit 2 naming --admin-port, not workers failing to listen forever', async (t) => {
  const port = await freePort()
  for (const host of ['0.0.0.0', 'localhost', '127.0.0.1']) {
    const r = await runBinary(['--workers', '1', '--host', host, '--port', String(port), '--admin-port', String(port)])
    t.equal(r.code, 2, `--host ${host}: exit 2`)
    t.match(r.stderr.trim(), new RegExp(`^meliproxy: --admin-port: 127\\.0\\.0\\.1:${port} takes the proxy's address ${host}:${port}: give the admin listener a port of its own$`), r.stderr.trim())
  }
})

t.test('a reload (SIGHUP) to an address that can never be listened on is rejected: the old workers serve, and one that dies is replaced on the old address', async (t) => {
  const [port, adminPort] = [await freePort(), await freePort()]
  const config = file('reload-address.yaml', `host: 127.0.0.1\nport: ${port}\nadminPort: ${adminPort}\nworkers: 2\nupstream: http://127.0.0.1:9\n`)
  const [cmd, argv] = binCommand(['--config', config])
  const proc = spawn(cmd, argv, { env: cleanEnv(), stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()))
  t.teardown(() => void proc.kill('SIGKILL'))
  const listening = async (): Promise<number> => {
    try {
      const r = await fetch(`http://127.0.0.1:${adminPort}/readyz`)
      return ((await r.json()) as { workers: { listening: number } }).workers.listening
    } catch {
      return -1
    }
  }
  t.ok(await waitFor(async () => (await listening()) === 2, 15_000), 'two workers listening')
  writeFileSync(config, `host: 192.0.2.1\nport: ${port}\nadminPort: ${adminPort}\nworkers: 2\nupstream: http://127.0.0.1:9\n`)
  proc.kill('SIGHUP')
  t.ok(await waitFor(() => /reload rejected/.test(stderr), 15_000), 'the reload is rejected')
  t.match(stderr, /"--port: cannot listen on 192\.0\.2\.1:\d+: this machine has no such address \(EADDRNOTAVAIL\)"/)
  process.kill(childPids(proc.pid!)[0]!, 'SIGKILL')
  // A generous deadline: a busy machine forks and starts the replacement slowly.
  t.ok(await waitFor(async () => /worker died/.test(stderr) && (await listening()) === 2, 20_000), 'the dead worker is replaced, listening')
  await new Promise((r) => setTimeout(r, 1_000))
  t.notMatch(stderr, /bind EADDRNOTAVAIL/, 'no worker tried the new address')
  t.equal(proc.exitCode, null, 'still running')
})

t.test('the launcher\'s last resort: an error nothing handled is one JSON line, at error priority under journald, exit 1', async (t) => {
  const cli = new URL('../../dist/cli.js', import.meta.url).href
  const script = file('fatal.mjs', `import { fatal } from ${JSON.stringify(cli)}\nfatal(new Error('boom'))\n`)
  for (const journald of [true, false]) {
    const out = join(dir, `fatal-${journald}.err`)
    const fd = openSync(out, 'w')
    const s = fstatSync(fd)
    const env = cleanEnv(journald ? { JOURNAL_STREAM: `${s.dev}:${s.ino}` } : {})
    const r = spawnSync('env', ['-u', 'NODE_OPTIONS', process.execPath, script], { env, stdio: ['ignore', 'ignore', fd] })
    closeSync(fd)
    t.equal(r.status, 1, 'exit code 1')
    const line = readFileSync(out, 'utf8')
    t.equal(line, `${journald ? '<3>' : ''}{"level":"error","msg":"fatal","error":"boom"}\n`, journald ? 'prefixed <3> for journald' : 'plain JSON elsewhere')
  }
})
