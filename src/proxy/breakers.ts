import type { Logger } from '../log.js'
import type { BreakerMessage } from '../messages.js'
import { CircuitBreaker, type BreakerOptions } from './breaker.js'
import type { BreakerState } from './types.js'
import type { UpstreamMetrics } from './metrics.js'

/**
 * The circuit breakers of one worker: one per route, and one for the upstream as a whole.
 *
 * Answers that say a route is sick (a 502/503/504, a headers or body timeout on it) count against that route's
 * breaker only, so one failing endpoint (`/items/:id`) leaves the others (`/categories/:id`) served; the route names
 * are the statistics' (src/stats/routes.ts, configurable with `statsRoutes`). Failures that say the upstream as a
 * whole is gone (connection refused or reset before any response, connect timeouts, DNS) count against the
 * upstream breaker: once it opens, every route answers 503 at once.
 */

/** What one upstream attempt said, for the breakers. */
export type Outcome =
  | 'ok'
  /** The upstream answered with a failing status: the route is sick, the upstream is alive. */
  | 'route'
  /** The route did not answer in time (headers or body timeout). */
  | 'route-timeout'
  /** The upstream could not be reached at all. */
  | 'upstream'

/** At most this many routes are tracked per worker; past it, a closed one is forgotten to make room. */
export const MAX_ROUTES = 1_000

/** Reports a breaker's change: `route` null for the upstream breaker. */
export type BreakerChange = (route: string | null, state: BreakerState) => void

export class Breakers {
  readonly upstream: CircuitBreaker
  readonly #routes = new Map<string, CircuitBreaker>()
  readonly #options: BreakerOptions
  readonly #onChange: BreakerChange
  readonly #now: () => number

  constructor(options: BreakerOptions, onChange: BreakerChange, now: () => number = Date.now) {
    this.#options = options
    this.#onChange = onChange
    this.#now = now
    this.upstream = new CircuitBreaker(options, (s) => onChange(null, s), now)
  }

  /** False when the breakers are off (`failures` 0): then they are not asked at all. */
  get enabled(): boolean {
    return this.#options.failures !== 0
  }

  /** Null when a request to `route` may go upstream; otherwise the breaker that refuses it. */
  admit(route: string): CircuitBreaker | null {
    if (this.#options.failures === 0) return null
    if (!this.upstream.allow()) return this.upstream
    const rb = this.#route(route)
    if (!rb.allow()) {
      this.upstream.release()
      return rb
    }
    return null
  }

  /** Reports what an admitted request found (null: no outcome, e.g. its client left). */
  record(route: string, outcome: Outcome | null): void {
    if (this.#options.failures === 0) return
    const rb = this.#routes.get(route)
    switch (outcome) {
      case null:
        this.upstream.release()
        rb?.release()
        break
      case 'ok':
        this.upstream.record(true)
        rb?.record(true)
        break
      case 'route':
        this.upstream.record(true) // it answered: the upstream is there
        rb?.record(false)
        break
      case 'route-timeout':
        this.upstream.release() // a slow route says nothing about the rest
        rb?.record(false)
        break
      case 'upstream':
        this.upstream.record(false)
        rb?.release()
        break
    }
  }

  /** The routes whose breaker is open or half-open now. */
  openRoutes(): string[] {
    const out: string[] = []
    for (const [route, b] of this.#routes) if (b.state !== 'closed') out.push(route)
    return out
  }

  /** How many routes are tracked. */
  get size(): number {
    return this.#routes.size
  }

  #route(route: string): CircuitBreaker {
    let b = this.#routes.get(route)
    if (b !== undefined) return b
    if (this.#routes.size >= MAX_ROUTES) this.#evict()
    b = new CircuitBreaker(this.#options, (s) => this.#onChange(route, s), this.#now)
    this.#routes.set(route, b)
    return b
  }

  /** Forgets the oldest closed route (or, when every tracked route is open, the oldest one). */
  #evict(): void {
    let victim: string | undefined
    for (const [route, b] of this.#routes) {
      if (b.state === 'closed') {
        victim = route
        break
      }
    }
    this.#routes.delete(victim ?? this.#routes.keys().next().value!)
  }
}

/**
 * What a worker does when one of its breakers changes state: the upstream metrics, one log line (an open breaker is
 * logged here, once, not per refused request), and a message to the primary (its board of every worker's breakers).
 */
export function breakerReporter(
  metrics: UpstreamMetrics,
  log: Logger,
  openMs: number,
  openRoutes: () => number,
  send: (msg: BreakerMessage) => void,
): BreakerChange {
  return (route, state) => {
    if (route === null) {
      metrics.state(state)
      if (state === 'open') log.warn('upstream circuit breaker open: refusing every upstream request', { openMs })
      else log.info('upstream circuit breaker ' + state)
    } else {
      metrics.route(route, state, openRoutes())
      if (state === 'open') log.warn('route circuit breaker open: refusing requests for this route', { route, openMs })
      else log.info('route circuit breaker ' + state, { route })
    }
    send({ meliproxy: 'breaker', route, state })
  }
}
