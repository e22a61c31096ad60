import type { IncomingHttpHeaders } from 'node:http'
import type { Dispatcher } from 'undici'
import { DecoratorHandler } from './decorator.js'
import { unreachable } from './failures.js'

/**
 * How many retries the upstream may get: each request deposits `ratio` of a retry (up to `cap`), each retry takes
 * one, so retries stay near `ratio` of traffic when the upstream fails and cannot multiply an outage.
 */
export class RetryBudget {
  #tokens: number
  readonly #ratio: number
  readonly #cap: number

  constructor(ratio: number, cap = 10) {
    this.#ratio = ratio
    this.#cap = cap
    this.#tokens = cap
  }

  /** A request was sent. */
  deposit(): void {
    this.#tokens = Math.min(this.#cap, this.#tokens + this.#ratio)
  }

  /** Takes one retry if the budget has it. */
  withdraw(): boolean {
    if (this.#tokens < 1) return false
    this.#tokens--
    return true
  }
}

/** When a request is sent again. */
export interface RetryPolicy {
  readonly budget: RetryBudget
  /** Retries per request at most. */
  readonly retries: number
  readonly onRetry: () => void
}

/** Methods a retry cannot repeat harmfully (RFC 9110 9.2.2). */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'])

/**
 * The retry interceptor (undici's lib/interceptor/retry.js, narrowed): a connection failure of an idempotent request
 * without a body, before any answer, is sent again, within the per-request count and the shared budget. The handler it
 * wraps never sees the failed attempt. Every request deposits into the budget; one that cannot be retried is passed
 * on unwrapped.
 */
export function retryInterceptor(policy: RetryPolicy): Dispatcher.DispatcherComposeInterceptor {
  return (dispatch) => (opts, handler) => {
    policy.budget.deposit()
    if (policy.retries === 0 || opts.body != null || !IDEMPOTENT.has(opts.method)) return dispatch(opts, handler)
    return dispatch(opts, new RetryHandler(dispatch, opts, handler, policy))
  }
}

class RetryHandler extends DecoratorHandler {
  readonly #dispatch: Dispatcher.Dispatch
  readonly #opts: Dispatcher.DispatchOptions
  readonly #policy: RetryPolicy
  #attempt = 0
  #answered = false

  constructor(dispatch: Dispatcher.Dispatch, opts: Dispatcher.DispatchOptions, inner: Dispatcher.DispatchHandler, policy: RetryPolicy) {
    super(inner)
    this.#dispatch = dispatch
    this.#opts = opts
    this.#policy = policy
  }

  override onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    if (statusCode >= 200) this.#answered = true
    this.inner.onResponseStart?.(controller, statusCode, headers, statusMessage)
  }

  override onResponseError(controller: Dispatcher.DispatchController, err: Error): void {
    const p = this.#policy
    if (!this.#answered && this.#attempt < p.retries && unreachable(err) && p.budget.withdraw()) {
      // A fresh attempt answers: this one steps aside without a word to the handler it wraps.
      this.#attempt++
      p.onRetry()
      this.#dispatch(this.#opts, this)
      return
    }
    this.inner.onResponseError?.(controller, err)
  }
}
