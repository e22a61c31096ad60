import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { Server as NetServer, type Socket } from 'node:net'
import type { Logger } from '../log.js'
import { normalizeIp } from '../net/ip.js'
import { Connections } from './connections.js'
import type { Exchange } from '../exchange.js'
import { answerRaw, parserRefusal, refuseConnect } from './reply.js'

/**
 * The proxy's HTTP/1.1 server in a worker: Node's server with our limits (header size and timeouts, a per-worker
 * connection cap), pipelining order and closing (src/proxy/connections.ts), refusals of the parser and of CONNECT,
 * and the drain. What to do with a request is the caller's (`serve`: the pipeline).
 */

/**
 * A keep-alive socket quiet this long (every request on it answered or none sent, and not a byte received since) is
 * closed while draining (counted from the drain's start at the earliest: see #drainStep), and may be closed to make
 * room for a new connection at --max-connections (see #closeOneIdle). Closing one the instant it goes quiet would race
 * with a client sending its next request on it.
 */
const IDLE_MS = 1_000

/** When a connection went quiet (opened, or its last answer went out), and the bytes it had received by then. */
interface Quiet {
  readonly at: number
  readonly bytesRead: number
}

/**
 * Bytes no pipeline stage saw as a request (refused by the parser, pipelined after a closing answer, a request the
 * client abandoned half-sent), for the access log and metrics. `status` is what the client received: 0 when nothing
 * was sent (`reason`: `after_close`, `parse_error_unsent`, `client_closed`).
 */
export interface EarlyRefusal {
  readonly ip: string
  readonly method: string
  readonly path: string
  readonly status: number
  readonly bytes: number
  readonly reason: string
  /** Counted as a refusal (false: the client left; nothing was refused). */
  readonly counted: boolean
}

/** What the server asks of the worker. */
export interface ProxyServerHooks {
  /** Serves a request accepted on its connection. */
  serve(req: IncomingMessage, res: ServerResponse): void
  /** A request or bytes refused before the pipeline: logged and counted by the worker. */
  refused(r: EarlyRefusal): void
  /**
   * The parser refused the rest of an exchange's request (a bad chunk, its body too slow: `reason` is Node's code):
   * the refusal was sent in place of its answer, and the exchange records itself when its response closes.
   */
  refusedDuring(x: Exchange, reason: string): void
  /** A new connection at --max-connections: an idle one was closed to make room, or the new one was refused. */
  atCap(action: 'idle_closed' | 'refused'): void
  /** Requests being answered now. */
  inFlight(): number
  /** The drain is over (nothing in flight, no socket left, or the drain timeout passed). */
  drained(): void
}

/** The server's part of the configuration (built at the edge, src/options.ts). */
export interface ProxyServerOptions {
  readonly port: number
  readonly host: string
  readonly maxHeaderSize: number
  readonly clientHeadersTimeout: number
  readonly clientRequestTimeout: number
  readonly clientKeepaliveTimeout: number
  readonly maxConnections: number
  readonly drainTimeout: number
}

export class ProxyServer {
  readonly #config: ProxyServerOptions
  readonly #hooks: ProxyServerHooks
  readonly #log: Logger
  readonly #server: Server
  /** The drain's step and deadline, cleared once drained (the process may go on: a test, an in-process worker). */
  readonly #drainTimers: NodeJS.Timeout[] = []
  readonly #connections = new Connections((socket) => this.#quietFrom(socket))
  /** Open client sockets. */
  readonly #sockets = new Set<Socket>()
  /**
   * Open sockets with nothing under way, oldest quiet first (a socket is moved to the end when it goes quiet again):
   * the candidates for making room at --max-connections, so a new connection at the cap looks at no busy one.
   */
  readonly #quiet = new Map<Socket, Quiet>()
  #draining = false
  /** When the drain began (0 before). */
  #drainStart = 0
  #drained = false

  constructor(config: ProxyServerOptions, hooks: ProxyServerHooks, log: Logger) {
    this.#config = config
    this.#hooks = hooks
    this.#log = log
    this.#server = createServer(
      {
        keepAliveTimeout: config.clientKeepaliveTimeout,
        maxHeaderSize: config.maxHeaderSize,
        headersTimeout: config.clientHeadersTimeout,
        requestTimeout: config.clientRequestTimeout,
        connectionsCheckingInterval: 1_000, // how often the two timeouts above are checked (Node's default is 30 s)
        requireHostHeader: false, // the guard stage checks Host, so the refusal is logged and closes in order
      },
      this.#request,
    )
    this.#server.on('connection', this.#connection)
    this.#server.on('clientError', this.#clientError)
    this.#server.on('connect', this.#connect)
  }

  /** Listens on the configured address (the cluster shares the socket between workers). */
  /** The port it listens on (the real one when the config said 0), or null before it listens. */
  port(): number | null {
    const a = this.#server.address()
    return a !== null && typeof a === 'object' ? a.port : null
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#server.once('error', reject)
      this.#server.listen(this.#config.port, this.#config.host, () => {
        this.#server.off('error', reject)
        resolve()
      })
    })
  }

  /** Every request Node parsed, in order per connection (pipelined ones too). */
  readonly #request = (req: IncomingMessage, res: ServerResponse): void => {
    const notAccepted = this.#connections.accept(req.socket, req, res)
    if (notAccepted !== null) {
      // Pipelined after an answer that closes the connection, or past the per-connection bound: never processed,
      // never answered, logged.
      return this.#hooks.refused({
        ip: normalizeIp(req.socket.remoteAddress ?? ''), method: req.method ?? '-', path: req.url ?? '-', status: 0, bytes: 0, reason: notAccepted, counted: true,
      })
    }
    this.#quiet.delete(req.socket)
    if (this.#draining) res.shouldKeepAlive = false
    this.#hooks.serve(req, res)
    // Decided before Node hands over the next pipelined request: after a closing answer nothing more is processed.
    if (!res.shouldKeepAlive) this.#connections.closeAfter(req.socket)
  }

  readonly #connection = (socket: Socket): void => {
    // At the cap, an idle keep-alive connection makes room (as nginx reuses idle connections); when none is idle (a
    // flood of connections), the new one is closed at once. (net.Server's maxConnections is not enforced for
    // connections the cluster primary hands over.)
    if (this.#sockets.size >= this.#config.maxConnections && !this.#closeOneIdle()) {
      this.#hooks.atCap('refused')
      socket.destroy()
      return
    }
    this.#sockets.add(socket)
    this.#quiet.set(socket, { at: Date.now(), bytesRead: 0 })
    socket.once('close', () => {
      this.#sockets.delete(socket)
      this.#quiet.delete(socket)
    })
  }

  /** Every request accepted on the socket is answered and it stays open (see Connections). */
  #quietFrom(socket: Socket): void {
    // A response cut by the client's leaving closes after its socket did.
    if (socket.destroyed || !this.#sockets.has(socket)) return
    this.#quiet.delete(socket)
    this.#quiet.set(socket, { at: Date.now(), bytesRead: socket.bytesRead })
  }

  /**
   * Closes the connection quiet the longest if it has been so for IDLE_MS; whether there was one. One on which a
   * request is arriving is not idle (a slow client in the middle of a request's head, or at the start of its next one;
   * a request pipelined partly before the last answer went out): it leaves the candidates until its next answer went
   * out. So each socket is looked at here once each time it goes quiet: a flood at the cap scans no busy connection.
   */
  #closeOneIdle(): boolean {
    const now = Date.now()
    for (const [s, q] of this.#quiet) {
      if (now - q.at < IDLE_MS) return false // and so are all after it
      this.#quiet.delete(s)
      if (!idle(s, q)) continue
      this.#sockets.delete(s)
      s.destroy()
      this.#hooks.atCap('idle_closed')
      return true
    }
    return false
  }

  /**
   * Bytes the parser refused (smuggling attempts, oversized or malformed headers, timeouts): a 4xx after the answers
   * to the requests pipelined before them, then close; logged and counted like any refused request. When they are the
   * rest of a request under way (a bad chunk, a body that did not arrive within --client-request-timeout), the 4xx is
   * that request's answer. Every line logged says what the client received: status 0 when nothing was sent.
   */
  readonly #clientError = (err: NodeJS.ErrnoException, socket: Socket): void => {
    if (err.code === 'ECONNRESET' || !socket.writable || socket.destroyed) {
      socket.destroy() // the client went away: nothing to answer; a request under way records itself
      return
    }
    const code = err.code ?? 'parse_error'
    this.#log.debug('client error', { code })
    const ip = normalizeIp(socket.remoteAddress ?? '')
    // Bytes after a request that asked to close: nothing is answered (the connection closes after that request's
    // answer), as for a request pipelined after any closing answer.
    if (code === 'HPE_CLOSED_CONNECTION') {
      this.#connections.closeAfter(socket)
      return this.#hooks.refused({ ip, method: '-', path: '-', status: 0, bytes: 0, reason: 'after_close', counted: true })
    }
    // The client ended its side in the middle of a request: nothing is answered and nothing was refused. The answers
    // to the requests before it still go out; a request under way cannot complete (its exchange records client_closed).
    if (code === 'HPE_INVALID_EOF_STATE') {
      const fate = this.#connections.refuse(socket, '')
      if (typeof fate !== 'string') socket.destroy()
      else if (fate !== 'answered') this.#hooks.refused({ ip, method: '-', path: '-', status: 0, bytes: 0, reason: 'client_closed', counted: false })
      return
    }
    const refusal = parserRefusal(code)
    const fate = this.#connections.refuse(socket, refusal.text)
    if (typeof fate !== 'string') {
      const x = answerRaw(fate, refusal, code)
      if (x !== null) this.#hooks.refusedDuring(x, code)
      else socket.destroy()
      return
    }
    if (fate === 'answered') return // the rest of a request already answered (and recorded): not a request of its own
    const sent = fate !== 'unsent'
    this.#hooks.refused({
      ip, method: '-', path: '-', status: sent ? refusal.status : 0, bytes: sent ? refusal.bytes : 0,
      reason: sent ? code : 'parse_error_unsent', counted: true,
    })
  }

  /** CONNECT (a tunnel to somewhere else) is not something this proxy does. */
  readonly #connect = (_req: IncomingMessage, socket: Socket): void => {
    refuseConnect(socket)
  }

  /** True once a drain began. */
  get draining(): boolean {
    return this.#draining
  }

  /**
   * Drain: stop accepting, let in-flight requests finish (their responses say Connection: close), then `drained`.
   * net.Server's close is used instead of http.Server's: the latter also drops idle keep-alive sockets at once,
   * which races with a client that is just sending its next request on one; here they get a short grace.
   */
  drain(reason: string): void {
    if (this.#draining) return
    this.#draining = true
    this.#log.info('draining', { reason, inFlight: this.#hooks.inFlight(), timeoutMs: this.#config.drainTimeout })
    NetServer.prototype.close.call(this.#server)
    // Every open socket gets IDLE_MS from now: one in use will carry a Connection: close response by then.
    this.#drainStart = Date.now()
    for (const s of this.#sockets) this.#connections.drain(s)
    this.#drainTimers.push(setInterval(this.#drainStep, 50))
    const deadline = setTimeout(() => {
      this.#log.warn('drain timeout: closing remaining connections', { inFlight: this.#hooks.inFlight() })
      this.#server.closeAllConnections()
      this.#done()
    }, this.#config.drainTimeout)
    this.#drainTimers.push(deadline.unref())
  }

  /**
   * While draining: a socket whose client keeps using it gets `Connection: close` on its next response and is
   * closed after it. One quiet for IDLE_MS (since the drain began at the earliest) is closed here: closing a socket
   * the instant it goes quiet would race with a client sending its next request on it. One on which a request is
   * arriving is left to finish it (within --client-headers-timeout and --client-request-timeout; the drain timeout
   * bounds the rest). Once nothing is in flight and no socket is left, done.
   */
  readonly #drainStep = (): void => {
    const since = Date.now() - IDLE_MS
    for (const [s, q] of this.#quiet) {
      if (Math.max(q.at, this.#drainStart) <= since && idle(s, q)) s.destroy()
    }
    if (this.#hooks.inFlight() === 0 && this.#sockets.size === 0) this.#done()
  }

  #done(): void {
    if (this.#drained) return
    this.#drained = true
    for (const timer of this.#drainTimers) clearTimeout(timer)
    this.#hooks.drained()
  }
}

/** Whether a socket quiet since `q` still is: no response in progress, no byte received since, no request begun. */
function idle(socket: Socket, q: Quiet): boolean {
  return !answering(socket) && socket.bytesRead === q.bytesRead && !(socket.bytesRead > 0 && midRequest(socket))
}

/** Whether a response is in progress on the socket (node sets `_httpMessage` until it is finished). */
function answering(socket: Socket): boolean {
  return (socket as Socket & { _httpMessage?: unknown })._httpMessage != null
}

/**
 * Whether node's parser of the socket has begun a request it has not finished (`duration()`: ms since it began, 0 when
 * none has; from the connection's opening on a new one, hence the caller's check for bytes received).
 */
function midRequest(socket: Socket): boolean {
  return ((socket as Socket & { parser?: { duration?(): number } | null }).parser?.duration?.() ?? 0) > 0
}
