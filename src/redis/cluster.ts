import { Cluster, type Redis } from 'ioredis'

/**
 * What the code using Redis needs to know of the topology, apart from how the connection is made (src/redis/client.ts,
 * which reads the Config): the client type, and whether it is a Redis Cluster (a multi-key command's keys must share a
 * slot there, and a keyspace SCAN must visit every master).
 */

/** A connection to whichever Redis is configured: one server (standalone, Sentinel's master) or a cluster. */
export type RedisClient = Redis | Cluster

/** True when the client is a Redis Cluster client. */
export function isCluster(client: RedisClient): client is Cluster {
  return client instanceof Cluster
}

/** Slots in a Redis Cluster. */
const CLUSTER_SLOTS = 16_384

/**
 * The connections that hold every key: the one server, or the masters serving every slot of a cluster by the
 * cluster's own slot map (CLUSTER SLOTS, asked of the first node that answers). A keyspace SCAN visits these. Throws
 * when a slot's master is not among this client's masters (one killed and not yet replaced, a promoted replica not
 * yet seen) or no master serves it: a visit of the masters the client has would miss that slot's keys. A listed
 * master that is down fails the caller's command instead.
 */
export async function keyHolders(client: RedisClient): Promise<Redis[]> {
  if (!isCluster(client)) return [client]
  const ranges = (await askAny(client.nodes('all'), (n) => n.cluster('SLOTS'))) as unknown as [number, number, [string, number]][]
  const known = new Map(client.nodes('master').map((n) => [`${n.options.host}:${n.options.port}`, n]))
  const holders = new Set<Redis>()
  let covered = 0
  for (const [from, to, [host, port]] of ranges) {
    const node = known.get(`${host}:${port}`)
    if (node === undefined) throw new Error(`slots ${from}-${to}: their master ${host}:${port} is not one this client has yet`)
    holders.add(node)
    covered += to - from + 1
  }
  if (covered < CLUSTER_SLOTS) throw new Error(`${CLUSTER_SLOTS - covered} slots have no master`)
  return [...holders]
}

/**
 * The first answer of `nodes` to `ask`, trying the connected ones first; the last failure when none answers. For a
 * command about the cluster (CLUSTER INFO, CLUSTER SLOTS): the cluster client sends one to a random master, which may
 * be the one that is down.
 */
export async function askAny<T>(nodes: readonly Redis[], ask: (node: Redis) => Promise<T>): Promise<T> {
  let failure: unknown = new Error('no cluster node known')
  for (const node of [...nodes].sort((a, b) => Number(b.status === 'ready') - Number(a.status === 'ready'))) {
    try {
      return await ask(node)
    } catch (err) {
      failure = err
    }
  }
  throw failure
}
