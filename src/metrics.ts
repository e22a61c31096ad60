import { Counter, Gauge, Histogram, collectDefaultMetrics, type Registry } from 'prom-client'

/**
 * The worker's Prometheus metrics. The primary sums them across workers (AggregatorRegistry).
 * Label values are bounded: methods outside the standard set become OTHER, and routes past MAX_ROUTES become "other".
 */

const METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT'])
const MAX_ROUTES = 200
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

/**
 * Counts by label set kept as plain numbers on the hot path and handed to a prom-client Counter when it collects:
 * one Map lookup per count instead of prom-client's label hashing on every inc().
 */
export class PendingCounts<L extends string> {
  readonly #pending = new Map<string, { readonly labels: Record<L, string>; n: number }>()

  /** Adds one to the series named by `key`; `labels` is called only the first time the key is seen. */
  add(key: string, labels: () => Record<L, string>): void {
    const p = this.#pending.get(key)
    if (p === undefined) this.#pending.set(key, { labels: labels(), n: 1 })
    else p.n++
  }

  /** Moves the counts into the counter (call from its collect()). */
  flushInto(counter: Counter<L>): void {
    for (const p of this.#pending.values()) {
      if (p.n === 0) continue
      counter.inc(p.labels as never, p.n)
      p.n = 0
    }
  }
}

/** Everything a worker records about requests. */
export class WorkerMetrics {
  readonly requests: Counter<'method' | 'status' | 'route'>
  readonly requestDuration: Histogram
  readonly upstreamDuration: Histogram
  readonly inFlight: Gauge
  readonly upstreamErrors: Counter<'error'>
  readonly #routes = new Set<string>()
  readonly #pending = new PendingCounts<'method' | 'status' | 'route'>()

  /** `inFlight` reports the requests being answered now; it is read when metrics are collected. */
  constructor(registry: Registry, inFlight: () => number) {
    const pending = this.#pending
    this.requests = new Counter({
      name: 'meliproxy_requests_total',
      help: 'Requests answered, by method, status and route',
      labelNames: ['method', 'status', 'route'],
      registers: [registry],
      collect() {
        pending.flushInto(this)
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
      collect() {
        this.set(inFlight())
      },
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
    this.#pending.add(m + ' ' + status + ' ' + route, () => ({ method: m, status: String(status), route }))
    this.requestDuration.observe(seconds)
  }
}
