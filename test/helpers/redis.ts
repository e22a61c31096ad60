import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { waitFor } from './meliproxy.js'
import { freePort } from './ports.js'

/** One redis-server process started by a test (standalone, replica or sentinel). */
export interface RedisProcess {
  readonly port: number
  readonly proc: ChildProcess
  /** A fresh client to this process (closed by stop()). */
  client(): Redis
  /** Sends a signal to this process only. */
  signal(sig: NodeJS.Signals): void
  /** Kills it (SIGKILL) and closes the clients made by client(). */
  stop(): Promise<void>
}

function launch(args: string[], port: number): RedisProcess {
  const proc = spawn('redis-server', args, { stdio: ['ignore', 'ignore', 'inherit'] })
  const clients: Redis[] = []
  let exited = false
  proc.once('exit', () => (exited = true))
  return {
    port,
    proc,
    client() {
      const c = new Redis({ port, host: '127.0.0.1', lazyConnect: false, maxRetriesPerRequest: 1, retryStrategy: () => 200 })
      c.on('error', () => {})
      clients.push(c)
      return c
    },
    signal(sig) {
      if (!exited) proc.kill(sig)
    },
    async stop() {
      for (const c of clients) c.disconnect()
      if (exited) return
      proc.kill('SIGCONT')
      proc.kill('SIGKILL')
      await new Promise<void>((r) => (exited ? r() : proc.once('exit', () => r())))
    },
  }
}

async function answers(port: number): Promise<boolean> {
  const c = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
  c.on('error', () => {})
  try {
    await c.connect()
    return (await c.ping()) === 'PONG'
  } catch {
    return false
  } finally {
    c.disconnect()
  }
}

/** Starts a standalone redis-server (no persistence) on a free loopback port. */
export async function startRedis(replicaOf?: number): Promise<RedisProcess> {
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), 'meliproxy-redis-'))
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    '--repl-diskless-sync-delay', '0', '--dir', dir]
  if (replicaOf !== undefined) args.push('--replicaof', '127.0.0.1', String(replicaOf))
  const r = launch(args, port)
  if (!(await waitFor(() => answers(port), 15_000))) {
    await r.stop()
    throw new Error(`redis-server on ${port} did not start`)
  }
  return r
}

/** A master, a replica and three sentinels watching them as `mymaster`. */
export interface SentinelTopology {
  readonly master: RedisProcess
  readonly replica: RedisProcess
  readonly sentinels: RedisProcess[]
  /** `127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3` for --redis-sentinels. */
  readonly sentinelList: string
  /** The port the sentinels currently name as master. */
  currentMasterPort(): Promise<number>
  stop(): Promise<void>
}

/** Starts the topology and waits until the replica is synced and every sentinel sees the other two. */
export async function startSentinels(): Promise<SentinelTopology> {
  const master = await startRedis()
  const replica = await startRedis(master.port)
  const sentinels: RedisProcess[] = []
  for (let i = 0; i < 3; i++) {
    const port = await freePort()
    const dir = mkdtempSync(join(tmpdir(), 'meliproxy-sentinel-'))
    const conf = join(dir, 'sentinel.conf')
    writeFileSync(
      conf,
      [
        `port ${port}`,
        'bind 127.0.0.1',
        `dir ${dir}`,
        `sentinel monitor mymaster 127.0.0.1 ${master.port} 2`,
        'sentinel down-after-milliseconds mymaster 1000',
        'sentinel failover-timeout mymaster 2000',
        '',
      ].join('\n'),
    )
    sentinels.push(launch([conf, '--sentinel'], port))
  }
  const topology: SentinelTopology = {
    master,
    replica,
    sentinels,
    sentinelList: sentinels.map((s) => `127.0.0.1:${s.port}`).join(','),
    async currentMasterPort() {
      const c = sentinels[0]!.client()
      const [, port] = (await c.call('SENTINEL', 'get-master-addr-by-name', 'mymaster')) as [string, string]
      return Number(port)
    },
    async stop() {
      await Promise.all([...sentinels, replica, master].map((p) => p.stop()))
    },
  }
  const replicaClient = replica.client()
  const synced = await waitFor(async () => {
    try {
      return /master_link_status:up/.test(await replicaClient.info('replication'))
    } catch {
      return false
    }
  }, 10_000)
  const sentinelClients = sentinels.map((s) => s.client())
  const meshed = await waitFor(async () => {
    try {
      for (const c of sentinelClients) {
        const info = (await c.call('SENTINEL', 'master', 'mymaster')) as string[]
        const others = Number(info[info.indexOf('num-other-sentinels') + 1])
        if (others < 2) return false
      }
      return true
    } catch {
      return false
    }
  }, 15_000)
  if (!synced || !meshed) {
    await topology.stop()
    throw new Error(`sentinel topology not ready (replica synced: ${synced}, sentinels meshed: ${meshed})`)
  }
  return topology
}

/** Three masters and three replicas in one Redis Cluster, every node on a free loopback port. */
export interface ClusterTopology {
  /** All six processes; which are masters changes on a failover (see masters()). */
  readonly nodes: RedisProcess[]
  /** `127.0.0.1:p1,...` of every node, for --redis-cluster. */
  readonly seedList: string
  /** The nodes that are masters now (asked of the nodes themselves; a dead one is left out). */
  masters(): Promise<RedisProcess[]>
  /** The node that serves `key` now. */
  masterOf(key: string): Promise<RedisProcess>
  /** Waits until every live node reports cluster_state:ok; false after `ms`. */
  healthy(ms: number): Promise<boolean>
  stop(): Promise<void>
}

/** How long a cluster node waits before it calls a silent peer failed (the replica takes over after it). */
export const CLUSTER_NODE_TIMEOUT_MS = 1_500

/**
 * Starts a 3-master + 3-replica Redis Cluster (redis-server --cluster-enabled yes, then redis-cli --cluster create)
 * and waits until every node reports cluster_state:ok and every replica is in sync. Each node has its own temp dir.
 */
export async function startCluster(): Promise<ClusterTopology> {
  const nodes: RedisProcess[] = []
  const stopAll = () => Promise.all(nodes.map((n) => n.stop())).then(() => {})
  for (let i = 0; i < 6; i++) {
    const port = await freePort()
    const busPort = await freePort()
    const dir = mkdtempSync(join(tmpdir(), 'meliproxy-cluster-'))
    nodes.push(
      launch(
        ['--port', String(port), '--bind', '127.0.0.1', '--cluster-enabled', 'yes', '--cluster-port', String(busPort),
          '--cluster-config-file', join(dir, 'nodes.conf'), '--cluster-node-timeout', String(CLUSTER_NODE_TIMEOUT_MS),
          // The masters that are up keep serving their slots while one fails over (the default refuses every key).
          '--cluster-require-full-coverage', 'no',
          '--save', '', '--appendonly', 'no', '--repl-diskless-sync-delay', '0', '--dir', dir],
        port,
      ),
    )
  }
  if (!(await waitFor(async () => (await Promise.all(nodes.map((n) => answers(n.port)))).every(Boolean), 15_000))) {
    await stopAll()
    throw new Error('cluster nodes did not start')
  }
  const created = await new Promise<number | null>((resolve) => {
    const cli = spawn('redis-cli', ['--cluster', 'create', ...nodes.map((n) => `127.0.0.1:${n.port}`), '--cluster-replicas', '1', '--cluster-yes'], {
      stdio: ['ignore', 'ignore', 'inherit'],
    })
    cli.once('exit', (code) => resolve(code))
    cli.once('error', () => resolve(null))
  })
  if (created !== 0) {
    await stopAll()
    throw new Error(`redis-cli --cluster create failed (exit ${created})`)
  }
  const clients = new Map(nodes.map((n) => [n, n.client()]))
  const alive = (n: RedisProcess) => n.proc.exitCode === null && n.proc.signalCode === null
  const topology: ClusterTopology = {
    nodes,
    seedList: nodes.map((n) => `127.0.0.1:${n.port}`).join(','),
    async masters() {
      const out: RedisProcess[] = []
      for (const n of nodes.filter(alive)) {
        const role = await clients.get(n)!.role().catch(() => null)
        if (role !== null && role[0] === 'master') out.push(n)
      }
      return out
    },
    async masterOf(key) {
      const slot = Number(await clients.get(nodes.find(alive)!)!.cluster('KEYSLOT', key))
      for (const n of await topology.masters()) {
        const slots = await clients.get(n)!.cluster('SLOTS')
        const owner = slots.find(([from, to]) => slot >= from && slot <= to)
        if (owner?.[2]?.[1] === n.port) return n
      }
      throw new Error(`no master serves ${key}`)
    },
    healthy(ms) {
      return waitFor(async () => {
        for (const n of nodes.filter(alive)) {
          const info = await clients.get(n)!.cluster('INFO').catch(() => '')
          if (!/cluster_state:ok/.test(String(info))) return false
        }
        return true
      }, ms)
    },
    stop: stopAll,
  }
  const synced = await waitFor(async () => {
    for (const n of nodes) {
      const info = await clients.get(n)!.info('replication').catch(() => '')
      if (/role:slave/.test(info) && !/master_link_status:up/.test(info)) return false
      if (!/role:/.test(info)) return false
    }
    return true
  }, 10_000)
  if (!synced || !(await topology.healthy(10_000))) {
    await stopAll()
    throw new Error(`redis cluster not ready (replicas synced: ${synced})`)
  }
  return topology
}
