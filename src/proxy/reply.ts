import type { ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { BodyTooLargeError, ErrorCodes, errorBody, MeliproxyError, SlowBodyError } from '../errors.js'
import type { Exchange } from '../exchange.js'

/**
 * Every write to a client: whole answers (a cache hit, a 304, a 429), error bodies, the upstream's answer as it
 * streams, early hints, and the raw refusals written on a socket before any request was parsed. Each write keeps what
 * was sent on the exchange (`status`, `bytes`); what happens after the answer (recording) runs once, from the
 * response's own 'close' (`onResponseEnd`), as fastify's lib/reply.js does, not from each place that answered.
 */

/** Answers whole: the status line, the fields (a flat name/value list) and the body. */
export function send(x: Exchange, status: number, statusMessage: string | undefined, headers: string[], body: Buffer | string | undefined): void {
  const res = x.res
  if (res.destroyed || x.answeredRaw) return // the client left (recorded as such), or the server answered it already
  if (statusMessage === undefined) res.writeHead(status, headers)
  else res.writeHead(status, statusMessage, headers)
  res.end(body)
  x.status = status
  x.bytes = body === undefined ? 0 : typeof body === 'string' ? Buffer.byteLength(body) : body.length
}

/** Answers with a JSON error body (`{"error", "message"}`), adding `extraHeaders` (Retry-After, X-Cache). */
export function sendError(x: Exchange, err: MeliproxyError, extraHeaders?: readonly string[]): void {
  const body = errorBody(err)
  const headers = ['content-type', 'application/json', 'content-length', String(Buffer.byteLength(body))]
  if (extraHeaders !== undefined) for (const h of extraHeaders) headers.push(h)
  // The rest of a body over the limit or too slow is never read: the connection cannot carry another request.
  if (err instanceof BodyTooLargeError || err instanceof SlowBodyError) x.res.shouldKeepAlive = false
  send(x, err.status, undefined, headers, body)
}

/** Starts a streamed answer (the upstream's): the status line and fields. */
export function sendHead(x: Exchange, status: number, statusMessage: string | undefined, headers: string[]): void {
  const res = x.res
  if (res.destroyed || x.answeredRaw) return
  if (statusMessage === undefined) res.writeHead(status, headers)
  else res.writeHead(status, statusMessage, headers)
  x.status = status
}

/** One chunk of a streamed answer; false when the client's socket is full (wait for its 'drain'). */
export function sendData(x: Exchange, chunk: Buffer): boolean {
  const res = x.res
  if (res.destroyed) return true
  x.bytes += chunk.length
  return res.write(chunk)
}

/** Ends a streamed answer. */
export function sendEnd(x: Exchange): void {
  x.res.end()
}

/** A streamed answer the upstream broke off: the status line went out, so cutting is the only honest signal. */
export function cut(x: Exchange, err: Error): void {
  x.res.destroy(err)
}

/** 103 Early Hints ahead of the answer (the upstream's Link fields). */
export function sendEarlyHints(x: Exchange, link: string | string[]): void {
  const res = x.res
  if (res.headersSent || res.destroyed) return
  try {
    res.writeEarlyHints({ link })
  } catch {
    // a Link value Node refuses to send: the hints are only hints
  }
}

const EXCHANGE = Symbol('meliproxy.exchange')
type Tagged = ServerResponse & { [EXCHANGE]?: Exchange }

/** The one 'close' listener of every response of a worker (no closure per request). */
export type EndListener = (this: ServerResponse) => void

/**
 * Makes the listener that runs once per exchange when its response closes (sent, cut, or its client gone): an
 * upstream request still running for it hears that the client left, an answer not completely sent is recorded with
 * status 0 and reason `client_closed` (unless we cut it ourselves, or the server answered it on the raw socket), then
 * `record`.
 */
export function onResponseEnd(record: (x: Exchange) => void): EndListener {
  return function ended(this: Tagged): void {
    const x = this[EXCHANGE]!
    if (x.recorded) return
    x.recorded = true
    // Not delivered: not ended, or still queued behind an earlier answer of a pipelined connection (never given the
    // socket, so never finished; a delivered answer is finished and then detached from it).
    if (!this.writableEnded || (this.socket === null && !this.writableFinished)) {
      x.departure?.clientLeft()
      if (x.error === null && !x.answeredRaw) {
        x.status = 0
        x.reason ??= 'client_closed'
      }
    }
    record(x)
  }
}

/** Hangs `ended` (from `onResponseEnd`) on the exchange's response. */
export function track(x: Exchange, ended: EndListener): void {
  ;(x.res as Tagged)[EXCHANGE] = x
  x.res.on('close', ended)
  // An answer queued behind an earlier one of a pipelined connection gets no 'close' of its own if the connection
  // dies before its turn (Node 20): the connection's close records it then (rare: a closure only for these).
  if (x.res.socket === null) x.req.socket.once('close', () => ended.call(x.res as Tagged))
}

/** What the proxy answers to bytes the parser refused: the status, our error code, and the raw response. */
export interface ParserRefusal {
  readonly status: number
  readonly code: string
  /** The whole response, with Connection: close. */
  readonly text: string
  /** Its body's length (what the access log counts). */
  readonly bytes: number
  /** The error it reports. */
  readonly error: MeliproxyError
}

const REASON_PHRASE: Record<number, string> = { 400: 'Bad Request', 405: 'Method Not Allowed', 408: 'Request Timeout', 431: 'Request Header Fields Too Large' }

function rawAnswer(err: MeliproxyError): string {
  const json = errorBody(err)
  return (
    `HTTP/1.1 ${err.status} ${REASON_PHRASE[err.status]}\r\ncontent-type: application/json\r\n` +
    `content-length: ${Buffer.byteLength(json)}\r\nconnection: close\r\n\r\n${json}`
  )
}

/** The answer to a request the parser refused (`clientError`, with Node's error code). */
export function parserRefusal(parserCode: string | undefined): ParserRefusal {
  const err =
    parserCode === 'HPE_HEADER_OVERFLOW'
      ? new MeliproxyError(ErrorCodes.HEADERS_TOO_LARGE, 'the request line and headers are too large')
      : parserCode === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? new MeliproxyError(ErrorCodes.REQUEST_TIMEOUT, 'the request did not arrive in time')
        : new MeliproxyError(ErrorCodes.BAD_REQUEST, 'malformed request')
  return { status: err.status, code: err.code, text: rawAnswer(err), bytes: Buffer.byteLength(errorBody(err)), error: err }
}

/**
 * The parser refused the rest of a request whose exchange is under way (a bad chunk in its body, or Node's
 * --client-request-timeout while its body arrives): `refusal` goes out on the raw socket in place of the exchange's
 * answer and the connection closes; the exchange records it (status and `reason`). When its answer already began,
 * the connection is cut instead. An answer still queued behind earlier ones of a pipelined connection goes out as a
 * normal answer in its turn (a raw write would cut the earlier ones). Returns the exchange, or null when none is (or
 * still needs to be) answered.
 */
export function answerRaw(res: ServerResponse, refusal: ParserRefusal, reason: string): Exchange | null {
  const x = (res as Tagged)[EXCHANGE]
  if (x === undefined || x.recorded || x.answeredRaw) return null
  x.reason = reason
  if (res.socket === null && !res.headersSent) {
    res.shouldKeepAlive = false
    sendError(x, refusal.error)
    x.answeredRaw = true // nothing else answers it now (its stage may still try)
    return x
  }
  x.answeredRaw = true
  const socket = res.socket ?? x.req.socket
  if (res.headersSent) {
    socket.destroy()
    return x
  }
  x.status = refusal.status
  x.bytes = refusal.bytes
  endRaw(socket, refusal.text)
  return x
}

const CONNECT_REFUSAL = rawAnswer(new MeliproxyError(ErrorCodes.METHOD_NOT_ALLOWED, 'CONNECT is not supported'))

/** CONNECT (a tunnel to somewhere else) is refused with 405, and the connection closed. */
export function refuseConnect(socket: Socket): void {
  socket.end(CONNECT_REFUSAL)
}

/** Writes a raw answer (a parser refusal) and closes the socket; a socket that cannot take it is closed. */
export function endRaw(socket: Socket, answer: string): void {
  if (socket.writable && !socket.destroyed) socket.end(answer)
  else socket.destroy()
}
