import { TopK } from './topk.js'
import type { Dims, StatsBatch } from './types.js'

/**
 * What a worker hands on about a stretch of requests, all within one minute: counts by dimensions, a latency
 * histogram and the heavy hitters. Plain data: it travels over IPC and is added into Redis or the primary's memory.
 */

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

/** Counts of one stretch of time as they are added up: from requests (a worker), or from batches (the stores). */
export class Tally {
  readonly counts = new Map<string, number>()
  readonly latency = new Map<number, number>()
  readonly ips: TopK
  readonly paths: TopK
  readonly pairs: TopK

  /** `time`: the start of the minute (or hour); `top`: heavy hitters kept per kind. */
  constructor(
    readonly time: number,
    top: number,
  ) {
    this.ips = new TopK(top)
    this.paths = new TopK(top)
    this.pairs = new TopK(top)
  }

  add(b: StatsBatch): void {
    for (const [k, n] of b.counts) this.counts.set(k, (this.counts.get(k) ?? 0) + n)
    for (const [k, n] of b.latency) this.latency.set(k, (this.latency.get(k) ?? 0) + n)
    for (const [k, n] of b.ips) this.ips.add(k, n)
    for (const [k, n] of b.paths) this.paths.add(k, n)
    for (const [k, n] of b.pairs) this.pairs.add(k, n)
  }

  batch(): StatsBatch {
    return {
      minute: this.time,
      counts: [...this.counts],
      latency: [...this.latency],
      ips: this.ips.top(),
      paths: this.paths.top(),
      pairs: this.pairs.top(),
    }
  }
}

/** Sums batches of the same minute into one (heavy hitters trimmed to `top` per kind); returns them oldest first. */
export function mergeBatches(batches: readonly StatsBatch[], top: number): StatsBatch[] {
  const byMinute = new Map<number, Tally>()
  for (const b of batches) {
    let tally = byMinute.get(b.minute)
    if (tally === undefined) {
      tally = new Tally(b.minute, top)
      byMinute.set(b.minute, tally)
    }
    tally.add(b)
  }
  return [...byMinute.values()].sort((a, b) => a.time - b.time).map((t) => t.batch())
}
