import { Counter, Gauge, type Registry } from 'prom-client'
import type { BreakerState } from './breaker.js'

/** Metrics of the upstream protection: the breaker's state, requests it refused, retries. */

const STATE_VALUE: Record<BreakerState, number> = { closed: 0, 'half-open': 1, open: 2 }

export class UpstreamMetrics {
  readonly #state: Gauge
  readonly refused: Counter
  readonly retries: Counter

  constructor(registry: Registry) {
    this.#state = new Gauge({
      name: 'meliproxy_upstream_breaker_state',
      help: 'Circuit breaker state, worst over the workers: 0 closed, 1 half-open, 2 open',
      registers: [registry],
      aggregator: 'max',
    })
    this.refused = new Counter({
      name: 'meliproxy_upstream_breaker_refused_total',
      help: 'Requests answered without asking the upstream because the breaker was open',
      registers: [registry],
    })
    this.retries = new Counter({
      name: 'meliproxy_upstream_retries_total',
      help: 'Upstream requests retried after a connection failure',
      registers: [registry],
    })
  }

  state(s: BreakerState): void {
    this.#state.set(STATE_VALUE[s])
  }
}
