import { spawnSync } from 'node:child_process'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'

/**
 * A local Redis Cluster of three masters and three replicas on loopback, for `npm run fleet -- --redis cluster` and
 * the bench: six `redis-server --cluster-enabled yes` (each with its own folder under `dir` and its own cluster bus
 * port), joined by `redis-cli --cluster create --cluster-replicas 1`. The caller starts (and later stops) each
 * process through `launch`, so it owns them.
 */

/** Runs `redis-cli` with these arguments; its stdout ('' when it failed). */
export function redisCli(args: string[]): string {
  return spawnSync('redis-cli', args, { encoding: 'utf8', timeout: 5_000 }).stdout ?? ''
}

/** Starts the six nodes, creates the cluster and waits until every node reports cluster_state:ok; the node ports. */
export async function startLocalCluster(
  dir: string,
  launch: (name: string, args: string[]) => void,
  freePort: () => Promise<number>,
): Promise<number[]> {
  const ports: number[] = []
  for (let i = 0; i < 6; i++) {
    const [port, bus] = [await freePort(), await freePort()]
    const nodeDir = join(dir, `cluster-${i}`)
    mkdirSync(nodeDir, { recursive: true })
    launch(`redis node ${i + 1}`, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--repl-diskless-sync-delay', '0', '--dir', nodeDir, '--cluster-enabled', 'yes', '--cluster-port', String(bus),
      '--cluster-config-file', join(nodeDir, 'nodes.conf'), '--cluster-node-timeout', '1500',
      // The masters that are up keep serving their slots while one fails over (the default refuses every key).
      '--cluster-require-full-coverage', 'no'])
    ports.push(port)
  }
  await until(() => ports.every((p) => redisCli(['-p', String(p), 'ping']).trim() === 'PONG'), 'the redis nodes did not start')
  const created = spawnSync('redis-cli', ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '1', '--cluster-yes'], {
    stdio: 'ignore',
  })
  if (created.status !== 0) throw new Error(`redis-cli --cluster create failed (exit ${created.status ?? created.signal})`)
  await until(() => ports.every((p) => /cluster_state:ok/.test(redisCli(['-p', String(p), 'cluster', 'info']))), 'the redis cluster did not reach cluster_state:ok')
  return ports
}

/** The ports of the nodes that are masters now. */
export function clusterMasters(ports: readonly number[]): number[] {
  return ports.filter((p) => redisCli(['-p', String(p), 'role']).split('\n')[0]?.trim() === 'master')
}

async function until(check: () => boolean, failure: string, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`${failure} within ${ms / 1000} s`)
    await new Promise((r) => setTimeout(r, 200))
  }
}
