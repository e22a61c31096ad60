import { Counter, Gauge, type Registry } from 'prom-client'
import type { BreakerState } from './types.js'

/** Metrics of the upstream protection: the breakers' states, requests they refused, retries. */

const STATE_VALUE: Record<BreakerState, number> = { closed: 0, 'half-open': 1, open: 2 }

export class UpstreamMetrics {
  readonly #state: Gauge
  readonly #routeOpens: Counter<'route'>
  readonly #openRoutes: Gauge
  readonly refused: Counter
  readonly retries: Counter

  constructor(registry: Registry) {
    this.#state = new Gauge({
      name: 'meliproxy_upstream_breaker_state',
      help: 'Upstream-wide circuit breaker state, worst over the workers: 0 closed, 1 half-open, 2 open',
      registers: [registry],
      aggregator: 'max',
    })
    this.#routeOpens = new Counter({
      name: 'meliproxy_route_breaker_opens_total',
      help: 'Times a route circuit breaker opened, by route',
      labelNames: ['route'],
      registers: [registry],
    })
    this.#openRoutes = new Gauge({
      name: 'meliproxy_route_breakers_open',
      help: 'Route circuit breakers open or half-open now, most in any one worker',
      registers: [registry],
      aggregator: 'max',
    })
    this.refused = new Counter({
      name: 'meliproxy_upstream_breaker_refused_total',
      help: 'Requests answered without asking the upstream because a breaker (upstream or route) was open',
      registers: [registry],
    })
    this.retries = new Counter({
      name: 'meliproxy_upstream_retries_total',
      help: 'Upstream requests retried after a connection failure',
      registers: [registry],
    })
  }

  /** The upstream breaker changed. */
  state(s: BreakerState): void {
    this.#state.set(STATE_VALUE[s])
  }

  /** A route breaker changed; `open` routes are open or half-open now. */
  route(route: string, s: BreakerState, open: number): void {
    if (s === 'open') this.#routeOpens.labels(route).inc()
    this.#openRoutes.set(open)
  }
}
