import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createConnection, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { startLocalCluster } from './redis-cluster.js'

/**
 * `npm run fleet -- --instances 3 --port 8080 [--redis sentinel|cluster] [meliproxy flags...]`: the whole topology on
 * this machine, on loopback. Redis master + replica + 3 sentinels (`--redis sentinel`, the default) or a Redis Cluster
 * of 3 masters + 3 replicas (`--redis cluster`), N meliproxy instances sharing it, and HAProxy with the shipped
 * config/haproxy.cfg in front (listening on --port). Every other flag goes to each instance. Ctrl-C (or SIGTERM)
 * stops everything it started, in order: HAProxy, the instances (each drains), then Redis; nothing is left running.
 */

const BIN = fileURLToPath(new URL('../../bin/meliproxy', import.meta.url))
const HAPROXY_CFG = fileURLToPath(new URL('../../config/haproxy.cfg', import.meta.url))
const EXIT_USAGE = 2

function usage(message: string): never {
  process.stderr.write(`meliproxy fleet: ${message}\n`)
  process.exit(EXIT_USAGE)
}

function intFlag(args: string[], name: string, def: number, min: number, max: number): number {
  const i = args.indexOf(name)
  if (i < 0) return def
  const raw = args[i + 1]
  const n = Number(raw)
  if (raw === undefined || !Number.isInteger(n) || n < min || n > max) usage(`${name}: ${JSON.stringify(raw ?? '')} is not a whole number from ${min} to ${max}`)
  args.splice(i, 2)
  return n
}

function choiceFlag<T extends string>(args: string[], name: string, choices: readonly T[]): T {
  const i = args.indexOf(name)
  if (i < 0) return choices[0]!
  const raw = args[i + 1] as T
  if (!choices.includes(raw)) usage(`${name}: ${JSON.stringify(raw ?? '')} is not one of ${choices.join(', ')}`)
  args.splice(i, 2)
  return raw
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
}

/** True once something accepts connections on the port. */
function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = createConnection({ port, host: '127.0.0.1' })
    c.once('connect', () => (c.destroy(), resolve(true)))
    c.once('error', () => resolve(false))
  })
}

async function waitListening(port: number, what: string, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    if (await listening(port)) return
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error(`${what} did not listen on ${port} within ${ms} ms`)
}

const children: { name: string; proc: ChildProcess }[] = []

function start(name: string, cmd: string, args: string[], out: 'inherit' | 'ignore' = 'ignore'): ChildProcess {
  // A process group of its own: Ctrl-C reaches only this command, which then stops each child in order.
  const proc = spawn(cmd, args, { stdio: ['ignore', out, 'inherit'], detached: true })
  children.push({ name, proc })
  proc.once('exit', (code, signal) => {
    if (!stopping) process.stderr.write(`meliproxy fleet: ${name} exited (${code ?? signal})\n`)
  })
  return proc
}

let stopping = false

/** SIGTERM, then SIGKILL after 15 s; resolves once the process exited. */
function terminate(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve()
  const exited = new Promise<void>((r) => proc.once('exit', () => r()))
  proc.kill('SIGTERM')
  const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000)
  return exited.finally(() => clearTimeout(timer))
}

/** Stops what was started, each by its own PID: HAProxy, then the instances together (they drain), then Redis. */
async function stopAll(tmp: string): Promise<void> {
  if (stopping) return
  stopping = true
  for (const phase of ['haproxy', 'meliproxy', '']) {
    const now = children.filter((c) => c.name.startsWith(phase))
    for (const c of now) children.splice(children.indexOf(c), 1)
    await Promise.all(now.map((c) => terminate(c.proc)))
  }
  rmSync(tmp, { recursive: true, force: true })
}

/** A running Redis topology: the meliproxy flags that reach it, and one line describing it. */
interface RedisTopology {
  readonly flags: string[]
  readonly description: string
}

function redisArgs(p: number, dir: string): string[] {
  return ['--port', String(p), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--repl-diskless-sync-delay', '0', '--dir', dir]
}

/** A master, a replica, three sentinels (shared/STACK.md: diskless sync without delay). */
async function startSentinels(tmp: string): Promise<RedisTopology> {
  const [master, replica] = [await freePort(), await freePort()]
  start('redis master', 'redis-server', redisArgs(master, tmp))
  await waitListening(master, 'redis master')
  start('redis replica', 'redis-server', [...redisArgs(replica, tmp), '--replicaof', '127.0.0.1', String(master)])
  const sentinels: number[] = []
  for (let i = 0; i < 3; i++) {
    const p = await freePort()
    const conf = join(tmp, `sentinel-${i}.conf`)
    writeFileSync(conf, [`port ${p}`, 'bind 127.0.0.1', `dir ${tmp}`, `sentinel monitor mymaster 127.0.0.1 ${master} 2`,
      'sentinel down-after-milliseconds mymaster 1000', 'sentinel failover-timeout mymaster 5000', ''].join('\n'))
    start(`sentinel ${i + 1}`, 'redis-server', [conf, '--sentinel'])
    sentinels.push(p)
  }
  for (const p of [replica, ...sentinels]) await waitListening(p, 'redis')
  const sentinelList = sentinels.map((p) => `127.0.0.1:${p}`).join(',')
  return {
    flags: ['--redis-sentinels', sentinelList],
    description: `redis master 127.0.0.1:${master}, replica 127.0.0.1:${replica}, sentinels ${sentinelList}`,
  }
}

/** Three masters and three replicas in one Redis Cluster (tools/redis-cluster.ts). */
async function startCluster(tmp: string): Promise<RedisTopology> {
  const ports = await startLocalCluster(tmp, (name, args) => start(name, 'redis-server', args), freePort)
  const addresses = ports.map((p) => `127.0.0.1:${p}`).join(',')
  return { flags: ['--redis-cluster', addresses], description: `redis cluster (3 masters, 3 replicas) ${addresses}` }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2)
  const instances = intFlag(args, '--instances', 3, 1, 64)
  const port = intFlag(args, '--port', 8080, 1, 65535)
  const topology = choiceFlag(args, '--redis', ['sentinel', 'cluster'] as const)
  const tools: [string, string][] = [['redis-server', 'redis-server'], ['haproxy', 'haproxy']]
  if (topology === 'cluster') tools.push(['redis-cli', 'redis-tools'])
  for (const [tool, pkg] of tools) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
      usage(`${tool} is not on the PATH; install it (apt-get install ${pkg}) and run again`)
    }
  }
  if (await listening(port)) usage(`--port: ${port} is already in use`)

  const tmp = mkdtempSync(join(tmpdir(), 'meliproxy-fleet-'))
  const stop = (): void => void stopAll(tmp).then(() => process.exit(0))
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
  try {
    const redis = topology === 'cluster' ? await startCluster(tmp) : await startSentinels(tmp)

    // The instances.
    const proxies: { port: number; admin: number }[] = []
    for (let i = 0; i < instances; i++) {
      const [p, a] = [await freePort(), await freePort()]
      proxies.push({ port: p, admin: a })
      start(`meliproxy ${i + 1}`, process.execPath, [BIN, '--host', '127.0.0.1', '--port', String(p), '--admin-port', String(a),
        ...redis.flags, '--instances', String(instances), '--trust-proxy', '127.0.0.1/32',
        '--shutdown-delay', '2s', '--no-access-log', ...args])
    }
    for (const p of proxies) await waitListening(p.port, 'meliproxy')

    // HAProxy with the shipped config: its bind and server lines rewritten for these ports.
    const servers = proxies.map((p, i) => `    server m${i + 1} 127.0.0.1:${p.port} check port ${p.admin}`).join('\n')
    const cfg = readFileSync(HAPROXY_CFG, 'utf8')
      .replace('bind 127.0.0.1:8080', `bind 127.0.0.1:${port}`)
      .replace(/^ {4}server .*$(\n {4}server .*$)*/m, servers)
    writeFileSync(join(tmp, 'haproxy.cfg'), cfg)
    start('haproxy', 'haproxy', ['-db', '-f', join(tmp, 'haproxy.cfg')])
    await waitListening(port, 'haproxy')

    const lines = [
      `meliproxy fleet ready: http://127.0.0.1:${port} (HAProxy in front of ${instances} instances)`,
      ...proxies.map((p, i) => `  instance ${i + 1}: proxy http://127.0.0.1:${p.port}, admin and dashboard http://127.0.0.1:${p.admin}/`),
      `  ${redis.description}`,
      `  dashboard: http://127.0.0.1:${proxies[0]!.admin}/`,
      'Ctrl-C stops everything.',
    ]
    process.stdout.write(lines.join('\n') + '\n')
  } catch (err) {
    process.stderr.write(`meliproxy fleet: ${(err as Error).message}; stopping what was started\n`)
    await stopAll(tmp)
    process.exit(1)
  }
}

void main()
