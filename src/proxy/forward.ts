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
}

/** Called once per forward. */
export type ForwardDone = (result: ForwardResult) => void

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
   * Forwards `req` with the prepared upstream headers and streams the answer into `res`, adding `extraHeaders`
   * (flat name/value list, e.g. RateLimit-*) to the response.
   */
  forward(
    req: IncomingMessage,
    res: ServerResponse,
    headers: string[],
    extraHeaders: readonly string[] | null,
    done: ForwardDone,
  ): void {
    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined
    const handler = new ProxyHandler(res, extraHeaders, done)
    res.once('close', handler.onClientClose)
    this.#pool.dispatch(
      {
        origin: this.#origin,
        path: req.url!,
        method: req.method as Dispatcher.HttpMethod,
        headers,
        body: hasBody ? req : null,
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

/** Per-request state of one forward: the client's response and undici's controller. */
class ProxyHandler implements Dispatcher.DispatchHandler {
  readonly #res: ServerResponse
  readonly #extraHeaders: readonly string[] | null
  readonly #done: ForwardDone
  readonly #started = performance.now()
  #controller: Dispatcher.DispatchController | null = null
  #result: ForwardResult = { status: 0, bytes: 0, upstreamMs: null, error: null }
  #finished = false

  constructor(res: ServerResponse, extraHeaders: readonly string[] | null, done: ForwardDone) {
    this.#res = res
    this.#extraHeaders = extraHeaders
    this.#done = done
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller
    if (this.#res.destroyed) controller.abort(new Error('client closed'))
  }

  onResponseStart(
    controller: Dispatcher.DispatchController,
    statusCode: number,
    headers: IncomingHttpHeaders,
    statusMessage?: string,
  ): void {
    if (statusCode < 200) return // 1xx interim responses are the upstream connection's business
    this.#result.status = statusCode
    if (this.#res.destroyed) {
      controller.abort(new Error('client closed'))
      return
    }
    const out = clientResponseHeaders(headers)
    if (this.#extraHeaders !== null) for (const h of this.#extraHeaders) out.push(h)
    if (statusMessage) this.#res.writeHead(statusCode, statusMessage, out)
    else this.#res.writeHead(statusCode, out)
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.#result.bytes += chunk.length
    if (!this.#res.write(chunk)) {
      controller.pause()
      this.#res.once('drain', this.#resume)
    }
  }

  onResponseEnd(): void {
    this.#result.upstreamMs = performance.now() - this.#started
    this.#res.end()
    this.#finish()
  }

  onResponseError(_controller: Dispatcher.DispatchController, err: Error): void {
    if (this.#finished) return
    const res = this.#res
    if (res.destroyed) {
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

  /** The client's response closed: stop the upstream if it was still sending. */
  readonly onClientClose = (): void => {
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
