import type { IncomingHttpHeaders } from 'node:http'
import type { Dispatcher } from 'undici'
import { CircuitOpenError, ClientAbortError } from '../errors.js'
import type { Departure, Exchange } from '../exchange.js'
import { toUpstreamError } from './failures.js'
import { clientResponseHeaders } from './headers.js'
import { cut, sendData, sendEarlyHints, sendEnd, sendError, sendHead } from './reply.js'

/**
 * Relays the upstream's answer to the client of one exchange, as undici streams it: the fields rewritten
 * (src/proxy/headers.ts) plus RateLimit-* and X-Cache, the body written as it arrives, pausing the upstream while the
 * client's socket is full (backpressure); 103 Early Hints go ahead; a failure becomes our error answer (or a cut, once
 * the status line went out). When the client leaves, the upstream request is aborted (`clientLeft`, through the
 * exchange's departure). The writes are src/proxy/reply.ts's.
 */
export class Relay implements Dispatcher.DispatchHandler, Departure {
  readonly #x: Exchange
  readonly #started = performance.now()
  #controller: Dispatcher.DispatchController | null = null
  #done = false

  constructor(x: Exchange) {
    this.#x = x
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller
    const x = this.#x
    if (x.res.destroyed) return controller.abort(new ClientAbortError())
    x.departure = this
  }

  onResponseStart(_controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    const x = this.#x
    if (statusCode < 200) {
      // Interim responses are never stored. 103 Early Hints go on to the client ahead of its answer (its Link fields);
      // 100 and 102 concern the upstream connection only (Node answers a client's Expect itself).
      if (statusCode === 103 && headers.link !== undefined) sendEarlyHints(x, headers.link)
      return
    }
    if (x.res.destroyed) return // the client left: its departure aborts this request (unless the cache reads on)
    const out = clientResponseHeaders(headers)
    if (x.rateHeaders !== null) for (const h of x.rateHeaders) out.push(h)
    if (x.cache !== undefined) out.push('x-cache', x.cache)
    sendHead(x, statusCode, statusMessage || undefined, out)
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (!sendData(this.#x, chunk)) {
      controller.pause()
      this.#x.res.once('drain', () => controller.resume())
    }
  }

  onResponseEnd(): void {
    const x = this.#x
    x.upstreamMs = performance.now() - this.#started
    this.#finish()
    sendEnd(x)
  }

  onResponseError(_controller: Dispatcher.DispatchController, err: Error): void {
    if (this.#done) return
    this.#finish()
    const x = this.#x
    if (err instanceof ClientAbortError || x.res.destroyed) return // nobody to answer
    const error = toUpstreamError(err)
    x.error = error
    if (error.status < 500) x.reason = error.code // the client's failing (its body too large or too slow), not the upstream's
    if (x.res.headersSent) return cut(x, err)
    sendError(x, error, err instanceof CircuitOpenError ? ['retry-after', String(err.retryAfterSeconds)] : undefined)
  }

  /** The client's response closed before the answer was complete: stop the upstream request. */
  clientLeft(): void {
    const c = this.#controller
    if (!this.#done && c !== null && !c.aborted) c.abort(new ClientAbortError())
  }

  #finish(): void {
    this.#done = true
    if (this.#x.departure === this) this.#x.departure = null
  }
}
