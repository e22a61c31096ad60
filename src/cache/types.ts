/** The cache's plain data that leaves it: purges (over IPC and pub/sub) and per-path rules (from the config). */

/** Keys or a path glob to drop. */
export interface Purge {
  readonly keys?: readonly string[]
  readonly glob?: string
}

/** A per-path-pattern override. */
export interface CacheRule {
  readonly path: string
  /** Freshness for cacheable responses that carry none, ms. */
  readonly ttlMs?: number
  /** Never cache these paths. */
  readonly bypass?: boolean
}
