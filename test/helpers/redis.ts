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
  if (!(await waitFor(() => answers(port), 5_000))) {
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
