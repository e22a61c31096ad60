/**
 * Every Redis key prefix and pub/sub channel meliproxy uses, in one list. Each is owned by one module (named here),
 * which alone builds and reads its keys.
 */

/**
 * Limiter buckets (src/limiter/redis-pool.ts), one hash each: fixed `w` window start, `c` tokens granted (expires 1 s
 * after the window); sliding: slot start -> tokens granted (expires a window and a slot after the last grant);
 * token-bucket: `l` tokens, `t` when, `s` lease slot, `h` held (expires once it would be full again, plus 2 s).
 */
export const BUCKET_PREFIX = 'mp:rl:'
/*
 * The part after BUCKET_PREFIX is built by src/limiter/rules.ts (bucketKeyOf): `<rule>[~<generation>]` then
 * `|<per values>` or `|#<hash>`. The rules controller deletes one on a reset of that one bucket.
 */

/** Rule sets (src/limiter/rule-store.ts): version counter, current version, history list; no expiry. */
export const RULES_VERSION_KEY = 'mp:limits:version'
export const RULES_CURRENT_KEY = 'mp:limits:current'
export const RULES_HISTORY_KEY = 'mp:limits:history'
/**
 * The same three on a Redis Cluster, where one script writes all three: the `{mp:limits}` hash tag puts them in one
 * slot (a script's keys must share one). Standalone and Sentinel keep the names above, so an existing store is read
 * as it is.
 */
export const CLUSTER_RULES_VERSION_KEY = '{mp:limits}:version'
export const CLUSTER_RULES_CURRENT_KEY = '{mp:limits}:current'
export const CLUSTER_RULES_HISTORY_KEY = '{mp:limits}:history'
/**
 * Hash rule -> generation (src/limiter/rule-store.ts): HINCRBY on a reset of the whole rule. The generation is part of
 * every bucket key of the rule, so a reset is this one step for the whole fleet; the old buckets are never read
 * again and expire by themselves. No expiry (one field per rule ever reset).
 */
export const RULES_GENERATIONS_KEY = 'mp:limits:generations'
/** Channel: a new rule set was stored (src/limiter/rule-store.ts); every primary re-reads it. */
export const RULES_CHANNEL = 'mp:limits:changed'
/**
 * Channel: a rule's counters were reset (JSON {rule, bucket: null, generation}: its new generation), or one bucket's
 * ({rule, bucket, generation}: that key was deleted); workers move to the new generation or drop the bucket's leases.
 */
export const LIMITS_RESET_CHANNEL = 'mp:limits:reset'

/** Stored responses (src/cache/tiers.ts): hash per URL, a field per variant; expire with the entry, at most --cache-l2-ttl-cap. */
export const ENTRY_PREFIX = 'mp:c:'
/** Miss leases (src/cache/tiers.ts): SET NX PX, 3 s. */
export const LEASE_PREFIX = 'mp:lease:'
/** Channel: cache purges, JSON {keys} or {glob}; every worker drops them from L1. */
export const PURGE_CHANNEL = 'mp:cache:purge'

/**
 * Statistics (src/stats/redis-store.ts): minute buckets (--stats-retention) and hourly rollups (--stats-rollup-retention),
 * `mp:st:<m|h>:<start ms>:<part>`. On a Redis Cluster each flush goes to one of STATS_CLUSTER_SHARDS shards,
 * `mp:st:{s:<shard>}:<m|h>:<start ms>:<part>` (one slot per shard, so a flush stays one MULTI; the shards spread the
 * writes of one minute over the masters), and a read adds the shards up.
 */
export const STATS_PREFIX = 'mp:st:'
/** Statistics shards on a Redis Cluster. */
export const STATS_CLUSTER_SHARDS = 12
