import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { endRaw } from './reply.js'

/**
 * HTTP/1.1 pipelining, per client connection (RFC 9112 9.3 and 9.6). Node parses every request a client pipelines
 * and hands each to the server at once, answering them in order; two things it leaves to us:
 * - Once an answer closes the connection (`Connection: close`: the client asked for it, a guard refused the request,
 *   the worker drains), no later request on that connection may be processed: its answer could never be sent, so
 *   forwarding it would execute something upstream that the client never hears about.
 * - A parse error after valid pipelined requests: the requests before it are answered first, then the error, then
 *   the connection closes (writing the error at once would cut the earlier answers).
 * - A bound: at most MAX_PIPELINED requests of one connection are processed at once. A request beyond it is not
 *   processed; the connection closes once the earlier ones are answered, and the client sends the rest again on a
 *   new connection (RFC 9112 9.3.2). So one connection holds at most MAX_PIPELINED request bodies and upstream
 *   requests, however many requests it pipelines.
 */

/** Requests of one connection processed at once (nginx processes one at a time). */
export const MAX_PIPELINED = 32

/** Why a request was not processed: pipelined after an answer that closes the connection, or past MAX_PIPELINED. */
export type NotAccepted = 'after_close' | 'pipeline_full'

interface State {
  /** Requests accepted on the connection whose responses have not closed yet. */
  pending: number
  /** No further request on this connection is processed. */
  closing: boolean
  /** A refusal to send once `pending` drops to 0, then close. */
  finalAnswer: string | null
  /** The last request accepted on the connection, and its response. */
  last: IncomingMessage | null
  lastRes: ServerResponse | null
  readonly socket: Socket
  /** The owner's `quiet` (see the constructor). */
  readonly quiet: (socket: Socket) => void
}

/** Where a connection's state hangs: on its socket, and on each of its responses (no lookup, no closure per request). */
const STATE = Symbol('meliproxy.connection')
type Tagged<T> = T & { [STATE]?: State }

/** A response on the connection closed (finished and handed to the socket, or cut): one listener for all. */
function answered(this: Tagged<ServerResponse>): void {
  const s = this[STATE]!
  s.pending--
  if (s.pending === 0 && s.finalAnswer !== null) {
    const answer = s.finalAnswer
    s.finalAnswer = null
    endRaw(s.socket, answer)
  } else if (s.pending === 0 && !s.closing) s.quiet(s.socket)
}

export class Connections {
  readonly #quiet: (socket: Socket) => void

  /** `quiet` is called when a connection that stays open has answered every request accepted on it. */
  constructor(quiet: (socket: Socket) => void) {
    this.#quiet = quiet
  }

  #state(socket: Tagged<Socket>): State {
    let s = socket[STATE]
    if (s === undefined) {
      s = { pending: 0, closing: false, finalAnswer: null, last: null, lastRes: null, socket, quiet: this.#quiet }
      socket[STATE] = s
    }
    return s
  }

  /**
   * A request arrived on `res`'s connection: null when it is to be processed, otherwise why not (it must not be
   * processed, nor answered: its answer could not be sent).
   */
  accept(socket: Socket, req: IncomingMessage, res: ServerResponse): NotAccepted | null {
    const s = this.#state(socket)
    // An earlier answer that closes the connection may have been decided after its request was handed on (a body read
    // whole, then refused as too large): the parser may already have read the next request from the same bytes.
    if (s.closing || (s.lastRes !== null && !s.lastRes.shouldKeepAlive)) {
      s.closing = true
      return 'after_close'
    }
    if (s.pending >= MAX_PIPELINED) {
      // Close once the requests in progress are answered; this one and any after it are sent again by the client.
      s.closing = true
      s.finalAnswer ??= ''
      return 'pipeline_full'
    }
    s.pending++
    s.last = req
    s.lastRes = res
    ;(res as Tagged<ServerResponse>)[STATE] = s
    res.on('close', answered)
    return null
  }

  /** The request just accepted is the connection's last: later ones on it are not processed. */
  closeAfter(socket: Socket): void {
    this.#state(socket).closing = true
  }

  /**
   * The worker drains: a connection whose last accepted request's answer has not begun closes after it, and that
   * answer says so (`Connection: close`); later requests on it are not processed. (One whose answer has begun keeps
   * its keep-alive answer and is closed once idle, or by the next request's answer. One with a parser refusal queued
   * after its answers keeps them as they are: that refusal, already logged as sent, goes out last and closes it.)
   */
  drain(socket: Socket): void {
    const s = (socket as Tagged<Socket>)[STATE]
    if (s === undefined || s.pending === 0 || s.lastRes === null || s.lastRes.headersSent) return
    if (s.finalAnswer !== null && s.finalAnswer !== '') return
    s.lastRes.shouldKeepAlive = false
    s.closing = true
  }

  /**
   * The parser refused bytes on the connection; what becomes of `answer` (a raw response with Connection: close, or ''
   * to close only):
   * - the bytes are the rest of the request being read (a bad chunk, a body too slow) and its answer is still to come:
   *   that response is returned, for the caller to answer in its place (src/proxy/reply.ts answerRaw);
   * - they are the rest of a request already answered (refused before its body was read) or whose client left:
   *   'answered', nothing more goes out (they are no request of their own), the connection closes after that answer;
   * - the connection was already closing after an earlier answer: 'unsent', nothing more goes out;
   * - otherwise the answer goes out once the requests before it are answered ('sent' at once, or 'queued'), then
   *   the connection closes.
   */
  refuse(socket: Socket, answer: string): 'sent' | 'queued' | 'unsent' | 'answered' | ServerResponse {
    const s = this.#state(socket)
    const wasClosing = s.closing
    s.closing = true
    const res = s.lastRes
    const rest = s.last !== null && !s.last.complete && res !== null
    if (rest && !res.writableEnded && !res.destroyed) return res
    if (rest) {
      if (s.pending === 0) endRaw(socket, '')
      else s.finalAnswer = ''
      return 'answered'
    }
    if (wasClosing) return 'unsent'
    if (s.pending === 0) {
      endRaw(socket, answer)
      return 'sent'
    }
    s.finalAnswer = answer
    return 'queued'
  }
}
