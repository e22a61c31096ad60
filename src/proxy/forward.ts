import type { IncomingMessage, ServerResponse, IncomingHttpHeaders } from 'node:http'
import { Pool, type Dispatcher } from 'undici'
import {
  MeliproxyError,
  UpstreamError,
  UpstreamTimeoutError,
  UpstreamUnreachableError,
} from '../errors.js'
import { clientResponseHeaders } from './headers.js'

/**
 * Forwarding one request to the upstream through an undici keep-alive pool, streaming both ways:
 * the request body is handed to undici as a stream; the response body is written as it arrives, pausing the
 * upstream when the client's socket is full (backpressure) and aborting it when the client goes away.
 */

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
  readonly headers: string[]
  /** The client's request body stream, or null. */
  readonly body: IncomingMessage | null
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
const TIMEOUT = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'ETIMEDOUT'])

/** Translates an undici/socket error into ours (502 or 504). */
export function toUpstreamError(err: Error): MeliproxyError {
  const code = (err as NodeJS.ErrnoException).code ?? ''
  if (TIMEOUT.has(code)) return new UpstreamTimeoutError(`upstream did not answer in time (${code})`)
  if (UNREACHABLE.has(code)) return new UpstreamUnreachableError(`upstream unreachable (${code})`)
  return new UpstreamError(`upstream request failed (${code || err.name})`)
}

/** Writes a JSON error body to a client whose response has not started. Returns the bytes written. */
export function sendError(res: ServerResponse, err: MeliproxyError, extraHeaders?: readonly string[]): number {
  const body = JSON.stringify(err.toJSON())
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

  constructor(origin: string, timeouts: ForwardTimeouts) {
    this.#origin = origin
    this.#timeouts = timeouts
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
   */
  forward(
    request: ForwardRequest,
    res: ServerResponse | null,
    extraHeaders: readonly string[] | null,
    tap: ResponseTap | null,
    done: ForwardDone,
  ): void {
    const handler = new ProxyHandler(res, extraHeaders, tap, done)
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

  /** Closes the pool's connections once their requests are done. */
  close(): Promise<void> {
    return this.#pool.close()
  }
}

function pushAll(target: string[], items: readonly string[]): string[] {
  for (const h of items) target.push(h)
  return target
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

  constructor(res: ServerResponse | null, extraHeaders: readonly string[] | null, tap: ResponseTap | null, done: ForwardDone) {
    this.#res = res
    this.#extraHeaders = extraHeaders
    this.#tap = tap
    this.#done = done
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller
    if (this.#res?.destroyed) controller.abort(new Error('client closed'))
  }

  onResponseStart(
    controller: Dispatcher.DispatchController,
    statusCode: number,
    headers: IncomingHttpHeaders,
    statusMessage?: string,
  ): void {
    if (statusCode < 200) return // 1xx interim responses are the upstream connection's business
    this.#result.status = statusCode
    const res = this.#res
    if (res !== null && res.destroyed && this.#tap === null) {
      controller.abort(new Error('client closed'))
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
    if (this.#tap !== null && this.#tap.onError(err) && this.#res !== null && !this.#res.headersSent) this.#res = null
    const res = this.#res
    if (res === null) {
      this.#result.error = toUpstreamError(err)
    } else if (res.destroyed) {
      this.#result.status = 0
    } else if (res.headersSent) {
      // The status line already went out: cutting the connection is the only honest signal of a truncated body.
      this.#result.error = toUpstreamError(err)
      res.destroy(err)
    } else {
      const error = toUpstreamError(err)
      this.#result.error = error
      this.#result.status = error.status
      this.#result.bytes = sendError(res, error)
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
      this.#controller.abort(new Error('client closed'))
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
