import { SHADOW } from './recorder.js'
import { splitDims, splitPair } from './batch.js'
import type { Dims } from './types.js'
import { percentile } from './latency.js'
import type { Bucket, Resolution } from './store.js'

/**
 * Answers `GET /api/stats` from stored buckets: totals over the range, a time series (one point per bucket), and the
 * top entries of one grouping.
 */

export const GROUPS = ['route', 'method', 'status', 'cache', 'rule', 'ip', 'path', 'pair'] as const
export type Group = (typeof GROUPS)[number]

/** Ranges up to this long are answered from minute buckets, longer ones from hourly rollups. */
export const MINUTE_RANGE_MS = 6 * 3_600_000

export interface StatsQuery {
  readonly from: number
  readonly to: number
  readonly group: Group
  readonly limit: number
}

/** Requests of a time range: how many, by status class and cache outcome, how many limited, latency percentiles. */
export interface Counts {
  readonly requests: number
  readonly status: Record<string, number>
  readonly cache: Record<string, number>
  readonly limited: number
  /** Requests a shadow rule would have rejected (they were not). */
  readonly wouldLimit: number
  readonly p50Ms: number | null
  readonly p99Ms: number | null
}

/** One bucket of the time series. */
export interface SeriesPoint extends Counts {
  readonly time: string
}

export interface StatsAnswer {
  readonly from: string
  readonly to: string
  readonly resolution: Resolution
  readonly group: Group
  readonly totals: Counts
  readonly series: SeriesPoint[]
  readonly top: { key: string; requests: number; ip?: string; path?: string }[]
}

/** The resolution a range is answered at. */
export function resolutionFor(from: number, to: number): Resolution {
  return to - from <= MINUTE_RANGE_MS ? 'minute' : 'hour'
}

function bump(rec: Record<string, number>, key: string, n: number): void {
  rec[key] = (rec[key] ?? 0) + n
}

function mergeInto<K>(into: Map<K, number>, from: ReadonlyMap<K, number>): void {
  for (const [k, n] of from) into.set(k, (into.get(k) ?? 0) + n)
}

const DIM_OF: Partial<Record<Group, keyof Dims>> = {
  route: 'route',
  method: 'method',
  status: 'status',
  cache: 'cache',
  rule: 'rule',
}

/** Sums the buckets into the answer. */
export function summarize(buckets: readonly Bucket[], q: StatsQuery, resolution: Resolution): StatsAnswer {
  const status: Record<string, number> = {}
  const cache: Record<string, number> = {}
  let requests = 0
  let limited = 0
  let wouldLimit = 0
  const latency = new Map<number, number>()
  const grouped = new Map<string, number>()
  const dim = DIM_OF[q.group]
  const series: SeriesPoint[] = []

  for (const b of buckets) {
    const point = { requests: 0, status: {} as Record<string, number>, cache: {} as Record<string, number>, limited: 0, wouldLimit: 0 }
    for (const [key, n] of b.counts) {
      const d = splitDims(key)
      point.requests += n
      bump(point.status, d.status, n)
      if (d.cache !== '-') bump(point.cache, d.cache, n)
      if (d.rule.startsWith(SHADOW)) point.wouldLimit += n
      else if (d.rule !== '') point.limited += n
      if (dim !== undefined && (dim !== 'rule' || d.rule !== '')) bump2(grouped, d[dim], n)
    }
    requests += point.requests
    limited += point.limited
    wouldLimit += point.wouldLimit
    for (const [k, n] of Object.entries(point.status)) bump(status, k, n)
    for (const [k, n] of Object.entries(point.cache)) bump(cache, k, n)
    mergeInto(latency, b.latency)
    if (q.group === 'ip') mergeInto(grouped, b.ips)
    if (q.group === 'path') mergeInto(grouped, b.paths)
    if (q.group === 'pair') mergeInto(grouped, b.pairs)
    series.push({
      time: new Date(b.time).toISOString(),
      ...point,
      p50Ms: percentile(b.latency, 0.5),
      p99Ms: percentile(b.latency, 0.99),
    })
  }

  const top = [...grouped]
    .sort((a, b) => b[1] - a[1])
    .slice(0, q.limit)
    .map(([key, n]) => (q.group === 'pair' ? { key, requests: n, ...splitPair(key) } : { key, requests: n }))
  return {
    from: new Date(q.from).toISOString(),
    to: new Date(q.to).toISOString(),
    resolution,
    group: q.group,
    totals: { requests, status, cache, limited, wouldLimit, p50Ms: percentile(latency, 0.5), p99Ms: percentile(latency, 0.99) },
    series,
    top,
  }
}

function bump2(m: Map<string, number>, key: string, n: number): void {
  m.set(key, (m.get(key) ?? 0) + n)
}
