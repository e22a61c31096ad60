/** The statistics' plain data: what a worker hands on over IPC. */

/** Requests by route, method, status class, cache outcome and limiting rule, keyed by `dimsKey()`. */
export interface StatsBatch {
  /** Start of the minute, ms since the epoch. */
  readonly minute: number
  readonly counts: readonly (readonly [string, number])[]
  /** Latency bucket index (see latency.ts) -> requests. */
  readonly latency: readonly (readonly [number, number])[]
  readonly ips: readonly (readonly [string, number])[]
  readonly paths: readonly (readonly [string, number])[]
  /** `ip path` -> requests. */
  readonly pairs: readonly (readonly [string, number])[]
}

/** The dimensions a request is counted under. */
export interface Dims {
  readonly route: string
  readonly method: string
  /** `2xx` .. `5xx`, or `aborted` when the client left before an answer. */
  readonly status: string
  /** HIT, MISS, STALE, BYPASS, or `-` when the cache did not see the request. */
  readonly cache: string
  /** The rule that rejected it, or `` when none did. */
  readonly rule: string
}
