import { dimsKey, Tally } from './batch.js'
import type { StatsBatch } from './types.js'
import { latencyBucket } from './latency.js'
import type { RouteNamer } from './routes.js'

/**
 * A worker's statistics between two flushes: a few Map updates per request, no I/O. `take()` (about once a second)
 * hands over what was counted as one batch per minute touched.
 */

/** Heavy hitters kept per flush interval and kind (ips, paths, pairs). */
const TOP_PER_FLUSH = 1_000
/** Distinct dimension keys per minute; past it new routes count as `other`. */
const MAX_KEYS = 2_000
const METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT'])
const STATUS_CLASS = ['aborted', '1xx', '2xx', '3xx', '4xx', '5xx']

/** The rule dimension of a request a shadow rule would have rejected: `shadow:<rule>`. */
export const SHADOW = 'shadow:'

/** What the recorder reads off a finished request. */
export interface Recorded {
  readonly time: number
  readonly path: string
  readonly method: string
  readonly ip: string
  readonly cache: string | undefined
  readonly limitedBy: string | undefined
  /** The shadow rule that would have rejected it (counted as `shadow:<rule>`; never as limited). */
  readonly shadowLimitedBy: string | undefined
}

export class StatsRecorder {
  readonly #routes: RouteNamer
  #minutes: Tally[] = []

  constructor(routes: RouteNamer) {
    this.#routes = routes
  }

  /** Counts one finished request. */
  record(r: Recorded, status: number, durationMs: number): void {
    const minuteStart = r.time - (r.time % 60_000)
    let m = this.#minutes[this.#minutes.length - 1]
    if (m === undefined || m.time !== minuteStart) m = this.#minute(minuteStart)
    const method = METHODS.has(r.method) ? r.method : 'OTHER'
    const status3 = STATUS_CLASS[status >= 100 && status < 600 ? Math.floor(status / 100) : 0]!
    const rule = r.limitedBy ?? (r.shadowLimitedBy === undefined ? '' : SHADOW + r.shadowLimitedBy)
    let key = dimsKey(this.#routes.name(r.path), method, status3, r.cache ?? '-', rule)
    if (!m.counts.has(key) && m.counts.size >= MAX_KEYS) key = dimsKey('other', method, status3, r.cache ?? '-', rule)
    m.counts.set(key, (m.counts.get(key) ?? 0) + 1)
    const b = latencyBucket(durationMs)
    m.latency.set(b, (m.latency.get(b) ?? 0) + 1)
    m.ips.add(r.ip)
    m.paths.add(r.path)
    m.pairs.add(r.ip + ' ' + r.path)
  }

  #minute(start: number): Tally {
    let m = this.#minutes.find((x) => x.time === start)
    if (m === undefined) {
      m = new Tally(start, TOP_PER_FLUSH)
      this.#minutes.push(m)
    }
    return m
  }

  /** Hands over everything counted since the last take. */
  take(): StatsBatch[] {
    const out = this.#minutes.map((m) => m.batch())
    this.#minutes = []
    return out
  }
}
