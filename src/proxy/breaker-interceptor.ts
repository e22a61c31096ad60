import type { IncomingHttpHeaders } from 'node:http'
import type { Dispatcher } from 'undici'
import { BodyTooLargeError, CircuitOpenError, ClientAbortError, SlowBodyError } from '../errors.js'
import type { Breakers, Outcome } from './breakers.js'
import { DecoratorHandler, NOT_SENT } from './decorator.js'
import { failureOutcome } from './failures.js'

/** An upstream request: undici's dispatch options plus the route the per-route breakers count it under. */
export interface RoutedRequest extends Dispatcher.DispatchOptions {
  /** The route name (src/stats/routes.ts): the unit of the per-route breakers. */
  readonly route: string
}

/** Statuses that count as the upstream failing, for the breaker. */
const FAILING_STATUS = new Set([502, 503, 504])

/**
 * The breaker interceptor: each attempt asks the breakers first; while one is open the request is answered at once
 * with a CircuitOpenError (503 with Retry-After, or the cache's stale copy), never sent. An attempt that goes reports
 * its outcome to the breakers once, from its own answer: its status, or what its failure says (a client that left
 * or sent too much says nothing about the upstream).
 */
export function breakerInterceptor(breakers: Breakers, onRefused: () => void): Dispatcher.DispatcherComposeInterceptor {
  return (dispatch) => (opts, handler) => {
    const route = (opts as RoutedRequest).route
    const refusing = breakers.admit(route)
    if (refusing === null) return dispatch(opts, new BreakerHandler(breakers, route, handler))
    onRefused()
    handler.onResponseError?.(NOT_SENT, new CircuitOpenError(refusing.retryAfterMs, refusing === breakers.upstream ? null : route))
    return true
  }
}

class BreakerHandler extends DecoratorHandler {
  readonly #breakers: Breakers
  readonly #route: string
  #answered = false
  #recorded = false

  constructor(breakers: Breakers, route: string, inner: Dispatcher.DispatchHandler) {
    super(inner)
    this.#breakers = breakers
    this.#route = route
  }

  #record(outcome: Outcome | null): void {
    if (this.#recorded) return
    this.#recorded = true
    this.#breakers.record(this.#route, outcome)
  }

  override onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    if (statusCode >= 200) {
      this.#answered = true
      this.#record(FAILING_STATUS.has(statusCode) ? 'route' : 'ok')
    }
    this.inner.onResponseStart?.(controller, statusCode, headers, statusMessage)
  }

  override onResponseError(controller: Dispatcher.DispatchController, err: Error): void {
    // The client's failings (it left, its body was too large or too slow) say nothing about the upstream.
    const clients = err instanceof ClientAbortError || err instanceof BodyTooLargeError || err instanceof SlowBodyError
    this.#record(clients ? null : failureOutcome(err, this.#answered))
    this.inner.onResponseError?.(controller, err)
  }
}
