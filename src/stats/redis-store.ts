import type { Redis } from 'ioredis'
import type { StatsBatch } from './types.js'
import { RESOLUTION_MS, TOP_KEEP, type Bucket, type Resolution, type Retention, type StatsStore } from './store.js'
import { STATS_PREFIX } from '../redis/keys.js'

/**
 * Statistics in Redis, shared by every instance. Per bucket (`mp:st:<m|h>:<start ms>:`): a hash of counts by
 * dimensions (`c`), a hash of latency buckets (`l`) and sorted sets of heavy hitters (`ip`, `path`, `pair`) trimmed
 * to TOP_KEEP. A flush is one MULTI/EXEC, so a batch is added whole or not at all; each key expires with its
 * retention.
 */


const RES_CODE: Record<Resolution, string> = { minute: 'm', hour: 'h' }
const TOPS = ['ips', 'paths', 'pairs'] as const
const TOP_SUFFIX: Record<(typeof TOPS)[number], string> = { ips: 'ip', paths: 'path', pairs: 'pair' }
/** Most buckets one read may touch (30 days of hours; 6 hours of minutes is 360). */
const MAX_READ_BUCKETS = 800

function bucketKey(res: Resolution, t: number, suffix: string): string {
  return `${STATS_PREFIX}${RES_CODE[res]}:${t}:${suffix}`
}

function pairsToMap<K>(flat: string[], key: (s: string) => K): Map<K, number> {
  const out = new Map<K, number>()
  for (let i = 0; i < flat.length; i += 2) out.set(key(flat[i]!), Number(flat[i + 1]))
  return out
}

export class RedisStatsStore implements StatsStore {
  readonly kind = 'redis'
  readonly #redis: Redis
  readonly #retention: Retention

  constructor(redis: Redis, retention: Retention) {
    this.#redis = redis
    this.#retention = retention
  }

  get ready(): boolean {
    return this.#redis.status === 'ready'
  }

  async apply(batches: readonly StatsBatch[]): Promise<void> {
    if (batches.length === 0) return
    const tx = this.#redis.multi()
    const touched = new Map<string, number>()
    for (const b of batches) {
      for (const res of ['minute', 'hour'] as const) {
        const t = b.minute - (b.minute % RESOLUTION_MS[res])
        const expireAt = t + RESOLUTION_MS[res] + this.#retention[res]
        const c = bucketKey(res, t, 'c')
        for (const [k, n] of b.counts) tx.hincrby(c, k, n)
        touched.set(c, expireAt)
        const l = bucketKey(res, t, 'l')
        for (const [k, n] of b.latency) tx.hincrby(l, String(k), n)
        touched.set(l, expireAt)
        for (const kind of TOPS) {
          if (b[kind].length === 0) continue
          const z = bucketKey(res, t, TOP_SUFFIX[kind])
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
    const p = this.#redis.pipeline()
    for (const t of times) {
      p.hgetall(bucketKey(resolution, t, 'c'))
      p.hgetall(bucketKey(resolution, t, 'l'))
      for (const kind of TOPS) p.zrevrange(bucketKey(resolution, t, TOP_SUFFIX[kind]), 0, TOP_KEEP - 1, 'WITHSCORES')
    }
    const results = (await p.exec()) ?? []
    for (const [err] of results) if (err) throw err
    const out: Bucket[] = []
    times.forEach((time, i) => {
      const r = results.slice(i * 5, i * 5 + 5).map(([, v]) => v)
      const counts = r[0] as Record<string, string>
      if (Object.keys(counts).length === 0) return
      const latency = r[1] as Record<string, string>
      out.push({
        time,
        counts: new Map(Object.entries(counts).map(([k, v]) => [k, Number(v)])),
        latency: new Map(Object.entries(latency).map(([k, v]) => [Number(k), Number(v)])),
        ips: pairsToMap(r[2] as string[], (s) => s),
        paths: pairsToMap(r[3] as string[], (s) => s),
        pairs: pairsToMap(r[4] as string[], (s) => s),
      })
    })
    return out
  }
}
