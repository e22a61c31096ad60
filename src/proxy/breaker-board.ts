import type { BreakerMessage } from '../messages.js'
import type { BreakerState } from './types.js'

/**
 * The primary's view of its workers' circuit breakers, as each last reported them (absent: closed): the upstream
 * breaker's state per worker and the routes open or half-open in it. /readyz, /api/status and the dashboard read it.
 */
export class BreakerBoard {
  readonly #workers = new Map<number, { upstream: BreakerState; routes: Map<string, BreakerState> }>()

  /** A worker reported a change. */
  report(workerId: number, msg: BreakerMessage): void {
    let b = this.#workers.get(workerId)
    if (b === undefined) this.#workers.set(workerId, (b = { upstream: 'closed', routes: new Map() }))
    if (msg.route === null) b.upstream = msg.state
    else if (msg.state === 'closed') b.routes.delete(msg.route)
    else b.routes.set(msg.route, msg.state)
  }

  /** A worker is gone. */
  forget(workerId: number): void {
    this.#workers.delete(workerId)
  }

  /** The worst upstream breaker state over the workers. */
  worstUpstream(): BreakerState {
    const states = [...this.#workers.values()].map((b) => b.upstream)
    return states.includes('open') ? 'open' : states.includes('half-open') ? 'half-open' : 'closed'
  }

  /** Routes whose breaker is open or half-open in some worker, sorted. */
  openRoutes(): string[] {
    const all = new Set<string>()
    for (const b of this.#workers.values()) for (const r of b.routes.keys()) all.add(r)
    return [...all].sort()
  }

  /** Per worker: its upstream breaker state and its open routes (for /api/status). */
  perWorker(): { upstream: Record<number, BreakerState>; routes: Record<number, Record<string, BreakerState>> } {
    const upstream: Record<number, BreakerState> = {}
    const routes: Record<number, Record<string, BreakerState>> = {}
    for (const [id, b] of this.#workers) {
      upstream[id] = b.upstream
      routes[id] = Object.fromEntries(b.routes)
    }
    return { upstream, routes }
  }
}
