import type { ServerResponse, IncomingHttpHeaders } from 'node:http'
import type { Readable } from 'node:stream'
import { Pool, type Dispatcher } from 'undici'
import {
  BodyTooLargeError,
  CircuitOpenError,
  errorBody,
  MeliproxyError,
  UpstreamError,
  UpstreamTimeoutError,
  UpstreamUnreachableError,
} from '../errors.js'
import type { RetryBudget } from './breaker.js'
import type { Breakers, Outcome } from './breakers.js'
import { clientResponseHeaders } from './headers.js'

/**
 * Forwarding one request to the upstream through an undici keep-alive pool, streaming both ways:
 * the request body is handed to undici as a stream; the response body is written as it arrives, pausing the
 * upstream when the client's socket is full (backpressure) and aborting it when the client goes away.
 */

/** How the forwarder protects the upstream and retries. */
export interface UpstreamPolicy {
  readonly breakers: Breakers
  readonly budget: RetryBudget
  /** Retries per request at most (connection failures of idempotent, body-less requests only). */
  readonly retries: number
  readonly onRetry: () => void
  readonly onRefused: () => void
}

/** Upstream timeouts, in milliseconds. */
export interface ForwardTimeouts {
  readonly connect: number
  readonly headers: number
  readonly body: number
}

/** What one forward did, handed to the caller's callback exactly once. */
export interface ForwardResult {
  /** Status sent to the client (the upstream's, or the error's), 0 if the client went away first. */
  status: number
  /** Body bytes written to the client. */
  bytes: number
  /** Milliseconds from dispatch to the end of the upstream response, or null when it never answered. */
  upstreamMs: number | null
  /** Set when the upstream failed. */
  error: MeliproxyError | null
  /** True once the upstream's status line was passed to the client. */
  forwarded: boolean
}

/** The result of an exchange answered without the upstream (from the cache, or refused): `status` and `bytes` sent. */
export function answered(status: number, bytes: number): ForwardResult {
  return { status, bytes, upstreamMs: null, error: null, forwarded: false }
}

/** Called once per forward. */
export type ForwardDone = (result: ForwardResult) => void

/**
 * Sees an upstream response as it streams (the cache stores from it). `onHeaders` may keep the response from the
 * client by returning false (a 304 to the cache's own conditional request, a 5xx the cache answers with stale
 * content); the caller then answers the client itself when the forward is done.
 */
export interface ResponseTap {
  onHeaders(status: number, statusMessage: string, headers: IncomingHttpHeaders, clientHeaders: readonly string[]): boolean
  onData(chunk: Buffer): void
  onEnd(): void
  /** The upstream failed; return true when the caller will answer the client (e.g. with stale content). */
  onError(err: Error): boolean
  /** True while the tap is collecting the body: then a client that leaves does not abort the upstream request. */
  readonly capturing: boolean
}

/** One upstream request. */
export interface ForwardRequest {
  readonly method: string
  readonly path: string
  /** The route name (src/stats/routes.ts): the unit of the per-route breakers. */
  readonly route: string
  readonly headers: string[]
  /** The client's request body stream, or null. */
  readonly body: Readable | null
}

const UNREACHABLE = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EPIPE',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
])
/** Methods a retry cannot repeat harmfully (RFC 9110 9.2.2). */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'])
/** Statuses that count as the upstream failing, for the breaker. */
const FAILING_STATUS = new Set([502, 503, 504])
const CLIENT_CLOSED = 'client closed'
const TIMEOUT = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'ETIMEDOUT'])

/**
 * What a failed attempt says: the upstream is gone (no connection, or one refused or reset before any response) or
 * the route is sick (it timed out, or failed once it had started answering).
 */
function failureOutcome(err: Error, answered: boolean): Outcome {
  const code = (err as NodeJS.ErrnoException).code ?? ''
  if (!answered && (UNREACHABLE.has(code) || code === 'UND_ERR_CONNECT_TIMEOUT')) return 'upstream'
  return TIMEOUT.has(code) ? 'route-timeout' : 'route'
}

/** Translates an undici/socket error into ours (502 or 504). */
export function toUpstreamError(err: Error): MeliproxyError {
  if (err instanceof MeliproxyError) return err // ours, e.g. a body over the limit
  const code = (err as NodeJS.ErrnoException).code ?? ''
  if (TIMEOUT.has(code)) return new UpstreamTimeoutError(`upstream did not answer in time (${code})`)
  if (UNREACHABLE.has(code)) return new UpstreamUnreachableError(`upstream unreachable (${code})`)
  return new UpstreamError(`upstream request failed (${code || err.name})`)
}

/** Writes a JSON error body to a client whose response has not started. Returns the bytes written. */
export function sendError(res: ServerResponse, err: MeliproxyError, extraHeaders?: readonly string[]): number {
  const body = errorBody(err)
  const headers = ['content-type', 'application/json', 'content-length', String(Buffer.byteLength(body))]
  if (extraHeaders) headers.push(...extraHeaders)
  res.writeHead(err.status, headers)
  res.end(body)
  return Buffer.byteLength(body)
}

/** The upstream side of the proxy: one undici Pool for the upstream origin. */
export class Forwarder {
  readonly #pool: Pool
  readonly #origin: string
  readonly #timeouts: ForwardTimeouts
  readonly #policy: UpstreamPolicy

  constructor(origin: string, timeouts: ForwardTimeouts, policy: UpstreamPolicy) {
    this.#origin = origin
    this.#timeouts = timeouts
    this.#policy = policy
    this.#pool = new Pool(origin, {
      connect: { timeout: timeouts.connect },
      headersTimeout: timeouts.headers,
      bodyTimeout: timeouts.body,
      keepAliveTimeout: 4_000,
    })
  }

  /**
   * Sends `request` upstream and streams the answer into `res` (when given; a background fetch has none), adding
   * `extraHeaders` (flat name/value list, e.g. RateLimit-*) to the response, and showing it to `tap` (when given).
   * While the breaker is open the request is refused at once (503, or the tap's stale answer).
   */
  forward(
    request: ForwardRequest,
    res: ServerResponse | null,
    extraHeaders: readonly string[] | null,
    tap: ResponseTap | null,
    done: ForwardDone,
  ): void {
    this.#policy.budget.deposit()
    this.#attempt(request, res, extraHeaders, tap, done, 0)
  }

  #attempt(
    request: ForwardRequest,
    res: ServerResponse | null,
    extraHeaders: readonly string[] | null,
    tap: ResponseTap | null,
    done: ForwardDone,
    attempt: number,
  ): void {
    const { breakers } = this.#policy
    const refusing = breakers.admit(request.route)
    if (refusing !== null) {
      this.#policy.onRefused()
      const route = refusing === breakers.upstream ? null : request.route
      new ProxyHandler(res, extraHeaders, tap, done, null).refuse(new CircuitOpenError(refusing.retryAfterMs, route))
      return
    }
    const handler = new ProxyHandler(res, extraHeaders, tap, done, {
      record: (outcome) => breakers.record(request.route, outcome),
      retry: (err) => {
        if (!this.#mayRetry(request, res, attempt, err)) return false
        this.#policy.onRetry()
        this.#attempt(request, res, extraHeaders, tap, done, attempt + 1)
        return true
      },
    })
    res?.once('close', handler.onClientClose)
    this.#pool.dispatch(
      {
        origin: this.#origin,
        path: request.path,
        method: request.method as Dispatcher.HttpMethod,
        headers: request.headers,
        body: request.body,
        headersTimeout: this.#timeouts.headers,
        bodyTimeout: this.#timeouts.body,
      },
      handler,
    )
  }

  /** Only connection failures, of idempotent requests without a body, within the per-request and overall budget. */
  #mayRetry(request: ForwardRequest, res: ServerResponse | null, attempt: number, err: Error): boolean {
    return (
      attempt < this.#policy.retries &&
      request.body === null &&
      IDEMPOTENT.has(request.method) &&
      UNREACHABLE.has((err as NodeJS.ErrnoException).code ?? '') &&
      res?.destroyed !== true &&
      this.#policy.budget.withdraw()
    )
  }

  /** Closes the pool's connections once their requests are done. */
  close(): Promise<void> {
    return this.#pool.close()
  }
}

function pushAll(target: string[], items: readonly string[]): string[] {
  for (const h of items) target.push(h)
  return target
}

/** How one attempt reports to the breakers (null: no outcome) and asks for a retry (true: a retry took over). */
interface AttemptHooks {
  record(outcome: Outcome | null): void
  retry(err: Error): boolean
}

/** Per-request state of one forward: the client's response (if any), the tap (if any) and undici's controller. */
class ProxyHandler implements Dispatcher.DispatchHandler {
  /** The client's response; null for a background fetch or once the tap kept the response from the client. */
  #res: ServerResponse | null
  readonly #extraHeaders: readonly string[] | null
  readonly #tap: ResponseTap | null
  readonly #done: ForwardDone
  readonly #started = performance.now()
  #controller: Dispatcher.DispatchController | null = null
  #result: ForwardResult = { status: 0, bytes: 0, upstreamMs: null, error: null, forwarded: false }
  #finished = false
  readonly #hooks: AttemptHooks | null
  #recorded = false

  constructor(
    res: ServerResponse | null,
    extraHeaders: readonly string[] | null,
    tap: ResponseTap | null,
    done: ForwardDone,
    hooks: AttemptHooks | null,
  ) {
    this.#res = res
    this.#extraHeaders = extraHeaders
    this.#tap = tap
    this.#done = done
    this.#hooks = hooks
  }

  /** The breaker is open: answer as for an upstream failure, with Retry-After, without asking the upstream. */
  refuse(err: CircuitOpenError): void {
    this.#fail(err, err, ['retry-after', String(err.retryAfterSeconds)])
  }

  #record(outcome: Outcome | null): void {
    if (this.#recorded) return
    this.#recorded = true
    this.#hooks?.record(outcome)
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller
    if (this.#res?.destroyed) controller.abort(new Error(CLIENT_CLOSED))
  }

  onResponseStart(
    controller: Dispatcher.DispatchController,
    statusCode: number,
    headers: IncomingHttpHeaders,
    statusMessage?: string,
  ): void {
    if (statusCode < 200) {
      // Interim responses are never stored. 103 Early Hints go on to the client ahead of its answer (its Link fields);
      // 100 and 102 concern the upstream connection only (Node answers a client's Expect itself).
      const res = this.#res
      if (statusCode === 103 && headers.link !== undefined && res !== null && !res.headersSent && !res.destroyed) {
        try {
          res.writeEarlyHints({ link: headers.link })
        } catch {
          // a Link value Node refuses to send: the hints are only hints
        }
      }
      return
    }
    this.#record(FAILING_STATUS.has(statusCode) ? 'route' : 'ok')
    this.#result.status = statusCode
    const res = this.#res
    if (res !== null && res.destroyed && this.#tap === null) {
      controller.abort(new Error(CLIENT_CLOSED))
      return
    }
    const out = clientResponseHeaders(headers)
    if (this.#tap !== null && !this.#tap.onHeaders(statusCode, statusMessage ?? '', headers, out)) this.#res = null
    if (this.#res === null || this.#res.destroyed) return
    this.#result.forwarded = true
    // The tap may keep `out` (the cache stores it): the extra fields go on a copy.
    const send = this.#extraHeaders === null ? out : this.#tap === null ? pushAll(out, this.#extraHeaders) : out.concat(this.#extraHeaders)
    if (statusMessage) this.#res.writeHead(statusCode, statusMessage, send)
    else this.#res.writeHead(statusCode, send)
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.#tap?.onData(chunk)
    const res = this.#res
    if (res === null || res.destroyed) return
    this.#result.bytes += chunk.length
    if (!res.write(chunk)) {
      controller.pause()
      res.once('drain', this.#resume)
    }
  }

  onResponseEnd(): void {
    this.#result.upstreamMs = performance.now() - this.#started
    this.#tap?.onEnd()
    this.#res?.end()
    this.#finish()
  }

  onResponseError(_controller: Dispatcher.DispatchController, err: Error): void {
    if (this.#finished) return
    const clientLeft = err.message === CLIENT_CLOSED
    // The client's doing (it left, or sent too much) says nothing about the upstream.
    this.#record(clientLeft || err instanceof BodyTooLargeError ? null : failureOutcome(err, this.#result.status !== 0))
    if (!clientLeft && this.#result.status === 0 && this.#hooks?.retry(err)) {
      // A fresh attempt answers the client: this one steps aside without reporting.
      this.#res?.off('close', this.onClientClose)
      this.#finished = true
      return
    }
    this.#fail(err, toUpstreamError(err), undefined)
  }

  /** The upstream failed (or was not asked): the tap may answer (stale), else an error response or a cut. */
  #fail(err: Error, error: MeliproxyError, headers: readonly string[] | undefined): void {
    if (this.#tap !== null && this.#tap.onError(err) && this.#res !== null && !this.#res.headersSent) this.#res = null
    const res = this.#res
    if (res === null) {
      this.#result.error = error
    } else if (res.destroyed) {
      this.#result.status = 0
    } else if (res.headersSent) {
      // The status line already went out: cutting the connection is the only honest signal of a truncated body.
      this.#result.error = error
      res.destroy(err)
    } else {
      this.#result.error = error
      this.#result.status = error.status
      if (error instanceof BodyTooLargeError) res.shouldKeepAlive = false // the rest of the body is unread
      this.#result.bytes = sendError(res, error, headers)
    }
    this.#finish()
  }

  /**
   * The client's response closed: stop the upstream if it was still sending, unless a tap is collecting the body
   * (then the fetch completes for the cache's sake, within the body timeout).
   */
  readonly onClientClose = (): void => {
    if (this.#tap !== null && this.#tap.capturing) {
      // It may be paused for the departed client's backpressure: no 'drain' will come, so read on for the tap.
      if (this.#controller?.paused) this.#controller.resume()
      return
    }
    if (!this.#finished && this.#controller !== null && !this.#controller.aborted) {
      this.#controller.abort(new Error(CLIENT_CLOSED))
    }
  }

  readonly #resume = (): void => {
    this.#controller?.resume()
  }

  #finish(): void {
    if (this.#finished) return
    this.#finished = true
    this.#done(this.#result)
  }
}
