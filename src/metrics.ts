import { Counter, Gauge, collectDefaultMetrics, type Metric, type Registry } from 'prom-client'

/**
 * The worker's Prometheus metrics. The primary sums them across workers (AggregatorRegistry).
 * Label values are bounded: methods outside the standard set become OTHER, and routes past MAX_ROUTES become "other".
 */

const METHOD_LIST = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT', 'OTHER'] as const
const METHOD_INDEX = new Map<string, number>(METHOD_LIST.map((m, i) => [m, i]))
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

  /** Adds one to the series named by `key`, whose labels were made in advance. */
  addSeries(key: string, labels: Record<L, string>): void {
    const p = this.#pending.get(key)
    if (p === undefined) this.#pending.set(key, { labels, n: 1 })
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

/**
 * A histogram without labels for the per-request path: observe() is one bucket search and three additions (prom-client's
 * Histogram also hashes the label set on every observe). It is registered in a prom-client Registry and answers get()
 * with the same JSON as prom-client's own Histogram, which is what the primary's AggregatorRegistry sums.
 */
export class HotHistogram {
  readonly name: string
  readonly help: string
  readonly type = 'histogram'
  readonly aggregator = 'sum'
  readonly #bounds: readonly number[]
  readonly #counts: Float64Array
  #sum = 0
  #count = 0

  constructor(name: string, help: string, bounds: readonly number[], registry: Registry) {
    this.name = name
    this.help = help
    this.#bounds = bounds
    this.#counts = new Float64Array(bounds.length + 1)
    registry.registerMetric(this as unknown as Metric)
  }

  /** Records one value. */
  observe(value: number): void {
    const bounds = this.#bounds
    let i = 0
    while (i < bounds.length && value > bounds[i]!) i++
    this.#counts[i]!++
    this.#sum += value
    this.#count++
  }

  /** The metric as prom-client's registry reads it. */
  async get(): Promise<unknown> {
    const values: { value: number; metricName: string; labels: Record<string, string | number> }[] = []
    let cumulative = 0
    for (let i = 0; i < this.#bounds.length; i++) {
      cumulative += this.#counts[i]!
      values.push({ value: cumulative, metricName: `${this.name}_bucket`, labels: { le: this.#bounds[i]! } })
    }
    cumulative += this.#counts[this.#bounds.length]!
    values.push({ value: cumulative, metricName: `${this.name}_bucket`, labels: { le: '+Inf' } })
    values.push({ value: this.#sum, metricName: `${this.name}_sum`, labels: {} })
    values.push({ value: this.#count, metricName: `${this.name}_count`, labels: {} })
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator }
  }
}

/** Everything a worker records about requests. */
export class WorkerMetrics {
  readonly requests: Counter<'method' | 'status' | 'route'>
  readonly requestDuration: HotHistogram
  readonly upstreamDuration: HotHistogram
  readonly inFlight: Gauge
  readonly upstreamErrors: Counter<'error'>
  /** Requests refused by the parser or the guards (and pipelined ones dropped after a closing answer), by reason. */
  readonly refused: Counter<'reason'>
  /** Request bodies, by how they went upstream: buffered (read whole first) or streamed. */
  readonly requestBodies: Counter<'mode'>
  /** Request bodies ended for arriving too slowly, by how they were going: buffered (never forwarded) or streamed. */
  readonly slowBodies: Counter<'mode'>
  readonly connectionsAtCap: Counter<'action'>
  /** route -> (status * 16 + method index) -> pending count: no string is built per request. */
  readonly #counts = new Map<string, Map<number, { readonly labels: Record<'method' | 'status' | 'route', string>; n: number }>>()

  /** `inFlight` reports the requests being answered now; it is read when metrics are collected. */
  constructor(registry: Registry, inFlight: () => number) {
    const counts = this.#counts
    this.requests = new Counter({
      name: 'meliproxy_requests_total',
      help: 'Requests answered, by method, status and route',
      labelNames: ['method', 'status', 'route'],
      registers: [registry],
      collect() {
        for (const byKey of counts.values()) {
          for (const p of byKey.values()) {
            if (p.n === 0) continue
            this.inc(p.labels, p.n)
            p.n = 0
          }
        }
      },
    })
    this.requestDuration = new HotHistogram(
      'meliproxy_request_duration_seconds',
      'Time from request received to response finished',
      LATENCY_BUCKETS,
      registry,
    )
    this.upstreamDuration = new HotHistogram(
      'meliproxy_upstream_duration_seconds',
      'Time from upstream request sent to upstream response finished',
      LATENCY_BUCKETS,
      registry,
    )
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
    this.refused = new Counter({
      name: 'meliproxy_refused_requests_total',
      help: 'Requests refused before the upstream (parser errors by Node code, guards by error code; after_close: pipelined after a closing answer)',
      labelNames: ['reason'],
      registers: [registry],
    })
    this.requestBodies = new Counter({
      name: 'meliproxy_request_bodies_total',
      help: 'Request bodies by mode: buffered (read whole before the upstream request) or streamed',
      labelNames: ['mode'],
      registers: [registry],
    })
    this.slowBodies = new Counter({
      name: 'meliproxy_slow_request_bodies_total',
      help: 'Requests answered 408 because their body arrived too slowly, by mode (buffered ones never reached the upstream)',
      labelNames: ['mode'],
      registers: [registry],
    })
    this.connectionsAtCap = new Counter({
      name: 'meliproxy_connections_at_cap_total',
      help: 'New client connections at --max-connections: idle_closed (an idle keep-alive connection was closed to make room), refused (none was idle; the new one was closed)',
      labelNames: ['action'],
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
    if (this.#counts.has(route)) return route
    if (this.#counts.size >= MAX_ROUTES) return 'other'
    this.#counts.set(route, new Map())
    return route
  }

  /** Records one finished request (`route` from route()). */
  observe(method: string, status: number, route: string, seconds: number): void {
    const m = METHOD_INDEX.get(method) ?? METHOD_LIST.length - 1
    let byKey = this.#counts.get(route)
    if (byKey === undefined) {
      byKey = new Map()
      this.#counts.set(route, byKey)
    }
    const key = status * 16 + m
    const p = byKey.get(key)
    if (p === undefined) byKey.set(key, { labels: { method: METHOD_LIST[m]!, status: String(status), route }, n: 1 })
    else p.n++
    this.requestDuration.observe(seconds)
  }
}
