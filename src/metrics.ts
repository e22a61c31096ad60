import { Counter, Gauge, Histogram, collectDefaultMetrics, type Registry } from 'prom-client'

/**
 * The worker's Prometheus metrics. The primary sums them across workers (AggregatorRegistry).
 * Label values are bounded: methods outside the standard set become OTHER, and routes past MAX_ROUTES become "other".
 * Request counts are kept in plain numbers on the hot path and handed to prom-client when it collects (a scrape),
 * because prom-client hashes the label set on every inc().
 */

const METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT'])
const MAX_ROUTES = 200
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

interface PendingCount {
  readonly labels: { method: string; status: string; route: string }
  n: number
}

/** Everything a worker records about requests. */
export class WorkerMetrics {
  readonly requests: Counter<'method' | 'status' | 'route'>
  readonly requestDuration: Histogram
  readonly upstreamDuration: Histogram
  readonly inFlight: Gauge
  readonly upstreamErrors: Counter<'error'>
  readonly #routes = new Set<string>()
  readonly #pending = new Map<string, PendingCount>()

  constructor(registry: Registry) {
    const pending = this.#pending
    this.requests = new Counter({
      name: 'meliproxy_requests_total',
      help: 'Requests answered, by method, status and route',
      labelNames: ['method', 'status', 'route'],
      registers: [registry],
      collect() {
        for (const p of pending.values()) {
          if (p.n === 0) continue
          this.inc(p.labels, p.n)
          p.n = 0
        }
      },
    })
    this.requestDuration = new Histogram({
      name: 'meliproxy_request_duration_seconds',
      help: 'Time from request received to response finished',
      buckets: LATENCY_BUCKETS,
      registers: [registry],
    })
    this.upstreamDuration = new Histogram({
      name: 'meliproxy_upstream_duration_seconds',
      help: 'Time from upstream request sent to upstream response finished',
      buckets: LATENCY_BUCKETS,
      registers: [registry],
    })
    this.inFlight = new Gauge({
      name: 'meliproxy_in_flight_requests',
      help: 'Requests being answered right now',
      registers: [registry],
    })
    this.upstreamErrors = new Counter({
      name: 'meliproxy_upstream_errors_total',
      help: 'Upstream failures, by error code',
      labelNames: ['error'],
      registers: [registry],
    })
    collectDefaultMetrics({ register: registry })
  }

  /** The bounded route label for a path: its first segment (`/categories/MLA1` -> `/categories`). */
  route(path: string): string {
    const end = path.indexOf('/', 1)
    const q = path.indexOf('?')
    let stop = end === -1 ? path.length : end
    if (q !== -1 && q < stop) stop = q
    const route = path.slice(0, stop) || '/'
    if (this.#routes.has(route)) return route
    if (this.#routes.size >= MAX_ROUTES) return 'other'
    this.#routes.add(route)
    return route
  }

  /** Records one finished request. */
  observe(method: string, status: number, route: string, seconds: number): void {
    const m = METHODS.has(method) ? method : 'OTHER'
    const key = m + ' ' + status + ' ' + route
    const p = this.#pending.get(key)
    if (p === undefined) this.#pending.set(key, { labels: { method: m, status: String(status), route }, n: 1 })
    else p.n++
    this.requestDuration.observe(seconds)
  }
}
