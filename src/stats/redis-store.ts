import { isCluster, type RedisClient } from '../redis/cluster.js'
import type { StatsBatch } from './types.js'
import { RESOLUTION_MS, TOP_KEEP, type Bucket, type Resolution, type Retention, type StatsStore } from './store.js'
import { STATS_CLUSTER_SHARDS, STATS_PREFIX } from '../redis/keys.js'

/**
 * Statistics in Redis, shared by every instance. Per bucket (`mp:st:<m|h>:<start ms>:`): a hash of counts by
 * dimensions (`c`), a hash of latency buckets (`l`) and sorted sets of heavy hitters (`ip`, `path`, `pair`) trimmed
 * to TOP_KEEP. A flush is one MULTI/EXEC, so a batch is added whole or not at all; each key expires with its
 * retention. On a Redis Cluster every key carries a shard's hash tag (`mp:st:{s:<n>}:...`, one slot per shard, so a
 * flush's MULTI is in one slot); flushes take the shards in turn, so one minute's writes spread over the masters
 * instead of one hot key, and a read adds the shards up.
 */


const RES_CODE: Record<Resolution, string> = { minute: 'm', hour: 'h' }
const TOPS = ['ips', 'paths', 'pairs'] as const
const TOP_SUFFIX: Record<(typeof TOPS)[number], string> = { ips: 'ip', paths: 'path', pairs: 'pair' }
/** Most buckets one read may touch (30 days of hours; 6 hours of minutes is 360). */
const MAX_READ_BUCKETS = 800

/** A bucket's key; `shard` null: the unsharded name (standalone, Sentinel). */
function bucketKey(res: Resolution, t: number, suffix: string, shard: number | null): string {
  return shard === null ? `${STATS_PREFIX}${RES_CODE[res]}:${t}:${suffix}` : `${STATS_PREFIX}{s:${shard}}:${RES_CODE[res]}:${t}:${suffix}`
}

function pairsToMap<K>(flat: string[], key: (s: string) => K): Map<K, number> {
  const out = new Map<K, number>()
  for (let i = 0; i < flat.length; i += 2) out.set(key(flat[i]!), Number(flat[i + 1]))
  return out
}

export class RedisStatsStore implements StatsStore {
  readonly kind = 'redis'
  readonly #redis: RedisClient
  readonly #retention: Retention
  /** The shards a read adds up: [null] (unsharded) or 0..STATS_CLUSTER_SHARDS-1. */
  readonly #shards: readonly (number | null)[]
  /** The shard of the next flush (cluster only; starts anywhere so instances do not move in step). */
  #nextShard: number

  constructor(redis: RedisClient, retention: Retention) {
    this.#redis = redis
    this.#retention = retention
    this.#shards = isCluster(redis) ? Array.from({ length: STATS_CLUSTER_SHARDS }, (_, i) => i) : [null]
    this.#nextShard = Math.floor(Math.random() * this.#shards.length)
  }

  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  async apply(batches: readonly StatsBatch[]): Promise<void> {
    if (batches.length === 0) return
    const shard = this.#shards[this.#nextShard]!
    this.#nextShard = (this.#nextShard + 1) % this.#shards.length
    const tx = this.#redis.multi()
    const touched = new Map<string, number>()
    for (const b of batches) {
      for (const res of ['minute', 'hour'] as const) {
        const t = b.minute - (b.minute % RESOLUTION_MS[res])
        const expireAt = t + RESOLUTION_MS[res] + this.#retention[res]
        const c = bucketKey(res, t, 'c', shard)
        for (const [k, n] of b.counts) tx.hincrby(c, k, n)
        touched.set(c, expireAt)
        const l = bucketKey(res, t, 'l', shard)
        for (const [k, n] of b.latency) tx.hincrby(l, String(k), n)
        touched.set(l, expireAt)
        for (const kind of TOPS) {
          if (b[kind].length === 0) continue
          const z = bucketKey(res, t, TOP_SUFFIX[kind], shard)
          for (const [k, n] of b[kind]) tx.zincrby(z, n, k)
          tx.zremrangebyrank(z, 0, -(TOP_KEEP + 1))
          touched.set(z, expireAt)
        }
      }
    }
    for (const [key, at] of touched) tx.pexpireat(key, at)
    const results = await tx.exec()
    const failed = results?.find(([err]) => err !== null)
    if (results === null || failed !== undefined) throw failed?.[0] ?? new Error('statistics transaction aborted')
  }

  async read(resolution: Resolution, from: number, to: number): Promise<Bucket[]> {
    const step = RESOLUTION_MS[resolution]
    const times: number[] = []
    for (let t = from - (from % step); t <= to && times.length < MAX_READ_BUCKETS; t += step) times.push(t)
    // One pipeline per shard: a cluster client sends a pipeline to one slot's master only.
    const perShard = await Promise.all(this.#shards.map((shard) => this.#readShard(resolution, times, shard)))
    const out: Bucket[] = []
    times.forEach((time, i) => {
      const parts = perShard.map((buckets) => buckets[i]).filter((b): b is Bucket => b != null)
      if (parts.length > 0) out.push(parts.length === 1 ? parts[0]! : addUp(time, parts))
    })
    return out
  }

  /** One shard's buckets at `times` (null where it holds none). */
  async #readShard(resolution: Resolution, times: readonly number[], shard: number | null): Promise<(Bucket | null)[]> {
    const p = this.#redis.pipeline()
    for (const t of times) {
      p.hgetall(bucketKey(resolution, t, 'c', shard))
      p.hgetall(bucketKey(resolution, t, 'l', shard))
      for (const kind of TOPS) p.zrevrange(bucketKey(resolution, t, TOP_SUFFIX[kind], shard), 0, TOP_KEEP - 1, 'WITHSCORES')
    }
    const results = (await p.exec()) ?? []
    for (const [err] of results) if (err) throw err
    return times.map((time, i) => {
      const r = results.slice(i * 5, i * 5 + 5).map(([, v]) => v)
      const counts = r[0] as Record<string, string>
      if (Object.keys(counts).length === 0) return null
      const latency = r[1] as Record<string, string>
      return {
        time,
        counts: new Map(Object.entries(counts).map(([k, v]) => [k, Number(v)])),
        latency: new Map(Object.entries(latency).map(([k, v]) => [Number(k), Number(v)])),
        ips: pairsToMap(r[2] as string[], (s) => s),
        paths: pairsToMap(r[3] as string[], (s) => s),
        pairs: pairsToMap(r[4] as string[], (s) => s),
      }
    })
  }
}

function sum<K>(maps: readonly ReadonlyMap<K, number>[]): Map<K, number> {
  const out = new Map<K, number>()
  for (const m of maps) for (const [k, n] of m) out.set(k, (out.get(k) ?? 0) + n)
  return out
}

/** The heaviest TOP_KEEP of the shards' heavy hitters added up. */
function top(maps: readonly ReadonlyMap<string, number>[]): Map<string, number> {
  return new Map([...sum(maps)].sort((a, b) => b[1] - a[1]).slice(0, TOP_KEEP))
}

/** One bucket from the shards' parts of it. */
function addUp(time: number, parts: readonly Bucket[]): Bucket {
  return {
    time,
    counts: sum(parts.map((b) => b.counts)),
    latency: sum(parts.map((b) => b.latency)),
    ips: top(parts.map((b) => b.ips)),
    paths: top(parts.map((b) => b.paths)),
    pairs: top(parts.map((b) => b.pairs)),
  }
}
