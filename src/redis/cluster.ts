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

/** The masters a client writes to: the cluster's masters, or the one server. */
export function masters(client: RedisClient): Redis[] {
  return isCluster(client) ? client.nodes('master') : [client]
}
