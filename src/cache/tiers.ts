import type { IncomingHttpHeaders } from 'node:http'
import type { Redis } from 'ioredis'
import { isCluster, keyHolders, type RedisClient } from '../redis/cluster.js'
import { LRUCache } from 'lru-cache'
import { compilePathGlob } from '../limiter/glob.js'
import { decodeEntry, encodeEntry, entrySize, keepMs, variantId, type CacheEntry } from './entry.js'
import type { CacheMetrics } from './metrics.js'
import { ENTRY_PREFIX, LEASE_PREFIX } from '../redis/keys.js'

/**
 * The two tiers. L1: lru-cache in this worker, bounded in bytes and by each entry's usefulness (fresh + stale
 * windows). L2: Redis, shared by every worker and instance: one hash per URL, one field per Vary variant, holding
 * the binary-encoded entry. Lookup goes L1, then L2 (an L2 hit is promoted to L1). L2 errors are misses.
 */

/** A key matcher for a path glob, matched against a key's path (without the origin and the query). */
export function pathGlobMatcher(origin: string, glob: string): ((key: string) => boolean) | string {
  const re = compilePathGlob(glob)
  if (typeof re === 'string') return re
  return (key) => {
    if (!key.startsWith(origin)) return false
    const target = key.slice(origin.length)
    const q = target.indexOf('?')
    return re.test(q === -1 ? target : target.slice(0, q))
  }
}

/**
 * Deletes from L2 every stored URL `match` accepts (a SCAN over the entry keys of every master serving a slot: a
 * cluster's keys are spread over its masters); returns how many. Rejects when a master could not be scanned, or
 * during a failover while a slot's new master is not known yet: some entries may be left (the caller says so).
 */
export async function dropSharedMatching(redis: RedisClient, match: (key: string) => boolean): Promise<number> {
  const counts = await Promise.all((await keyHolders(redis)).map((node) => dropMatchingOn(node, match)))
  return counts.reduce((a, b) => a + b, 0)
}

async function dropMatchingOn(node: Redis, match: (key: string) => boolean): Promise<number> {
  let n = 0
  let cursor = '0'
  do {
    const [next, found] = await node.scan(cursor, 'MATCH', ENTRY_PREFIX + '*', 'COUNT', 500)
    cursor = next
    const doomed = found.filter((k) => match(k.slice(ENTRY_PREFIX.length)))
    if (doomed.length > 0) n += await deleteKeys(node, doomed)
  } while (cursor !== '0')
  return n
}

/**
 * Deletes keys in one round trip. A cluster node refuses a DEL of keys in different slots (CROSSSLOT), so each key is
 * its own DEL there, in one pipeline to that node (or, through a cluster client, one DEL per key routed by its slot).
 */
async function deleteKeys(redis: RedisClient, keys: readonly string[]): Promise<number> {
  if (isCluster(redis)) {
    const counts = await Promise.all(keys.map((k) => redis.del(k)))
    return counts.reduce((a, b) => a + b, 0)
  }
  const p = redis.pipeline()
  for (const k of keys) p.del(k)
  const results = (await p.exec()) ?? []
  return results.reduce((n, [err, v]) => n + (err === null ? Number(v) : 0), 0)
}

/** Tier sizes and bounds. */
export interface TierOptions {
  /** L1 bytes; 0 turns L1 off. */
  readonly l1Bytes: number
  /** The longest an entry lives in L2, ms. */
  readonly l2TtlCapMs: number
}

/** Where a hit came from. */
export type Tier = 'l1' | 'l2'

/** A lookup's answer. */
export interface Found {
  readonly entry: CacheEntry
  readonly tier: Tier
}

function pick(variants: readonly CacheEntry[], requestHeaders: IncomingHttpHeaders): CacheEntry | null {
  for (const v of variants) {
    if (v.variant === variantId(v.vary, requestHeaders)) return v
  }
  return null
}

/** L1 and L2 together. */
export class Tiers {
  readonly #l1: LRUCache<string, CacheEntry[]> | null
  readonly #redis: RedisClient | null
  readonly #options: TierOptions
  readonly #metrics: CacheMetrics

  constructor(redis: RedisClient | null, options: TierOptions, metrics: CacheMetrics) {
    this.#redis = redis
    this.#options = options
    this.#metrics = metrics
    this.#l1 =
      options.l1Bytes > 0
        ? new LRUCache<string, CacheEntry[]>({
            maxSize: options.l1Bytes,
            sizeCalculation: (variants, key) => variants.reduce((n, e) => n + entrySize(e), 0) + key.length,
          })
        : null
    metrics.sizes(() => ({ bytes: this.#l1?.calculatedSize ?? 0, entries: this.#l1?.size ?? 0 }))
  }

  /** True when L2 can be asked now. */
  get l2Ready(): boolean {
    return this.#redis !== null && this.#redis.status === 'ready'
  }

  /** Looks in L1 (synchronously), then L2. */
  lookup(key: string, requestHeaders: IncomingHttpHeaders): Found | null | Promise<Found | null> {
    const local = this.#l1?.get(key)
    if (local !== undefined) {
      const entry = pick(local, requestHeaders)
      if (entry !== null) return { entry, tier: 'l1' }
    }
    if (!this.l2Ready) return null
    return this.lookupL2(key, requestHeaders)
  }

  /** Looks in L2 only, promoting what it finds to L1. */
  async lookupL2(key: string, requestHeaders: IncomingHttpHeaders): Promise<Found | null> {
    if (!this.l2Ready) return null
    const started = performance.now()
    let stored: Record<string, Buffer>
    try {
      stored = await this.#redis!.hgetallBuffer(ENTRY_PREFIX + key)
    } catch {
      this.#metrics.l2Errors.inc()
      return null
    } finally {
      this.#metrics.l2Duration.observe((performance.now() - started) / 1000)
    }
    const variants: CacheEntry[] = []
    for (const buf of Object.values(stored)) {
      const e = decodeEntry(buf)
      if (e !== null) variants.push(e)
    }
    if (variants.length === 0) return null
    this.#setL1(key, variants)
    const entry = pick(variants, requestHeaders)
    return entry === null ? null : { entry, tier: 'l2' }
  }

  /** Stores a variant in both tiers (L2 in the background; its failure is counted, never thrown). */
  store(key: string, entry: CacheEntry): void {
    const ttl = keepMs(entry)
    if (ttl <= 0) return
    const others = (this.#l1?.get(key) ?? []).filter((v) => v.variant !== entry.variant)
    this.#setL1(key, [...others, entry])
    if (!this.l2Ready) return
    const redisKey = ENTRY_PREFIX + key
    this.#redis!.multi()
      .hset(redisKey, entry.variant, encodeEntry(entry))
      .pexpire(redisKey, Math.max(1_000, Math.min(ttl, this.#options.l2TtlCapMs)))
      .exec()
      .catch(() => this.#metrics.l2Errors.inc())
  }

  #setL1(key: string, variants: CacheEntry[]): void {
    if (this.#l1 === null) return
    const ttl = Math.max(...variants.map(keepMs))
    if (ttl <= 0) return
    this.#l1.set(key, variants, { ttl: Math.ceil(ttl) })
  }

  /** Drops keys from this worker's L1. */
  dropLocal(match: (key: string) => boolean): number {
    if (this.#l1 === null) return 0
    let n = 0
    for (const key of [...this.#l1.keys()]) {
      if (match(key)) {
        this.#l1.delete(key)
        n++
      }
    }
    return n
  }

  /** Drops keys from L2: the exact keys given, or every key `match` accepts (a SCAN). */
  async dropShared(keys: readonly string[] | null, match: (key: string) => boolean): Promise<number> {
    if (!this.l2Ready) return 0
    const redis = this.#redis!
    try {
      if (keys !== null) return keys.length === 0 ? 0 : await deleteKeys(redis, keys.map((k) => ENTRY_PREFIX + k))
      return await dropSharedMatching(redis, match)
    } catch {
      this.#metrics.l2Errors.inc()
      return 0
    }
  }

  /** Tries to take the miss lease for a key (one fetcher across all instances). True when taken or when L2 is off. */
  async lease(key: string, ms: number): Promise<boolean> {
    if (!this.l2Ready) return true
    try {
      return (await this.#redis!.set(LEASE_PREFIX + key, '1', 'PX', ms, 'NX')) === 'OK'
    } catch {
      this.#metrics.l2Errors.inc()
      return true
    }
  }

  /** Gives a lease back. */
  release(key: string): void {
    if (!this.l2Ready) return
    this.#redis!.del(LEASE_PREFIX + key).catch(() => this.#metrics.l2Errors.inc())
  }
}
