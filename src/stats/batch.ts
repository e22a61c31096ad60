/**
 * What a worker hands on about a stretch of requests, all within one minute: counts by dimensions, a latency
 * histogram and the heavy hitters. Plain data: it travels over IPC and is added into Redis or the primary's memory.
 */

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

/** Tab separates the fields: a request target, a method, a cache label and a rule name cannot hold one. */
const SEP = '\t'

export function dimsKey(route: string, method: string, status: string, cache: string, rule: string): string {
  return route + SEP + method + SEP + status + SEP + cache + SEP + rule
}

export function splitDims(key: string): Dims {
  const [route = '', method = '', status = '', cache = '', rule = ''] = key.split(SEP)
  return { route, method, status, cache, rule }
}

/** `ip path` pair keys: an IP holds no space and a path starts with `/`. */
export function splitPair(key: string): { ip: string; path: string } {
  const i = key.indexOf(' ')
  return { ip: key.slice(0, i), path: key.slice(i + 1) }
}

/** Sums batches of the same minute into one (heavy hitters trimmed to `top` per kind); returns them oldest first. */
export function mergeBatches(batches: readonly StatsBatch[], top: number): StatsBatch[] {
  const byMinute = new Map<number, StatsBatch[]>()
  for (const b of batches) {
    const list = byMinute.get(b.minute)
    if (list === undefined) byMinute.set(b.minute, [b])
    else list.push(b)
  }
  const sum = <K>(lists: readonly (readonly (readonly [K, number])[])[]): Map<K, number> => {
    const m = new Map<K, number>()
    for (const list of lists) for (const [k, n] of list) m.set(k, (m.get(k) ?? 0) + n)
    return m
  }
  const trimmed = (m: Map<string, number>): [string, number][] => [...m].sort((a, b) => b[1] - a[1]).slice(0, top)
  return [...byMinute]
    .sort((a, b) => a[0] - b[0])
    .map(([minute, list]) =>
      list.length === 1
        ? list[0]!
        : {
            minute,
            counts: [...sum(list.map((b) => b.counts))],
            latency: [...sum(list.map((b) => b.latency))],
            ips: trimmed(sum(list.map((b) => b.ips))),
            paths: trimmed(sum(list.map((b) => b.paths))),
            pairs: trimmed(sum(list.map((b) => b.pairs))),
          },
    )
}
