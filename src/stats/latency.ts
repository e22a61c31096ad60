/**
 * Latency histograms that add up across workers, instances and minutes: fixed log-spaced buckets (each 10% wider
 * than the last, from 0.05 ms to about 10 minutes), stored as bucket index -> count. A percentile read from them is
 * the upper bound of its bucket, so it is at most 10% above the true value.
 */

const FIRST_MS = 0.05
const GROWTH = 1.1
const LOG_GROWTH = Math.log(GROWTH)
export const LATENCY_BUCKETS = 175

/** The bucket of a duration in ms. */
export function latencyBucket(ms: number): number {
  if (!(ms > FIRST_MS)) return 0
  const i = Math.ceil(Math.log(ms / FIRST_MS) / LOG_GROWTH)
  return i >= LATENCY_BUCKETS ? LATENCY_BUCKETS - 1 : i
}

/** The upper bound of a bucket, ms. */
export function bucketUpperMs(i: number): number {
  return FIRST_MS * GROWTH ** i
}

/** The q-quantile (0..1) of a histogram (bucket index -> count), ms; null when it holds nothing. */
export function percentile(hist: ReadonlyMap<number, number>, q: number): number | null {
  let total = 0
  for (const n of hist.values()) total += n
  if (total === 0) return null
  const rank = Math.max(1, Math.ceil(q * total))
  let seen = 0
  for (const i of [...hist.keys()].sort((a, b) => a - b)) {
    seen += hist.get(i)!
    if (seen >= rank) return Math.round(bucketUpperMs(i) * 1000) / 1000
  }
  return null
}
