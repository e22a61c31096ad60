import cluster from 'node:cluster'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { Server as NetServer, type Socket } from 'node:net'
import { AggregatorRegistry, Registry } from 'prom-client'
import type { Config } from './config.js'
import { ErrorCodes, MeliproxyError } from './errors.js'
import { AccessLog, createLogger } from './log.js'
import { isMeliproxyMessage } from './messages.js'
import { WorkerMetrics } from './metrics.js'
import { IpSet, normalizeIp } from './net/ip.js'
import { Forwarder, sendError, type ForwardResult } from './proxy/forward.js'
import { upstreamRequestHeaders } from './proxy/headers.js'

/**
 * A worker process: builds its dependencies from the Config, then serves the proxy on the socket it shares with
 * the other workers. The request path, top to bottom, is `handle()` below.
 */

const BAD_TARGET = new MeliproxyError(ErrorCodes.BAD_REQUEST, 400, 'request target must be a path (origin-form)')

/** Starts serving; resolves once the proxy listens. */
export async function startWorker(config: Config): Promise<void> {
  const workerId = cluster.worker?.id ?? 0
  const log = createLogger(config.logLevel, process.stderr, { worker: workerId })
  const accessLog = config.accessLog ? new AccessLog(process.stdout, workerId) : null

  const registry = new Registry()
  AggregatorRegistry.setRegistries([registry])
  new AggregatorRegistry() // answers the primary's metric requests over IPC (prom-client's cluster protocol)
  const metrics = new WorkerMetrics(registry)

  const upstreamHost = new URL(config.upstream).host
  const trusted = new IpSet(config.trustProxy)
  const forwarder = new Forwarder(config.upstream, {
    connect: config.connectTimeout,
    headers: config.headersTimeout,
    body: config.bodyTimeout,
  })

  let draining = false
  let inFlight = 0

  /** One request: admission checks, then the upstream; measured when the response closes. */
  function handle(req: IncomingMessage, res: ServerResponse): void {
    const started = performance.now()
    const time = Date.now()
    inFlight++
    metrics.inFlight.inc()
    if (draining) res.shouldKeepAlive = false
    const peerIp = normalizeIp(req.socket.remoteAddress ?? '')
    const url = req.url!

    const finish = (result: ForwardResult): void => {
      inFlight--
      metrics.inFlight.dec()
      const durationMs = performance.now() - started
      const route = metrics.route(url)
      metrics.observe(req.method!, result.status, route, durationMs / 1000)
      if (result.upstreamMs !== null) metrics.upstreamDuration.observe(result.upstreamMs / 1000)
      if (result.error !== null) {
        metrics.upstreamErrors.labels(result.error.code).inc()
        log.warn('upstream error', { code: result.error.code, detail: result.error.message, path: url })
      }
      accessLog?.write({
        time,
        ip: peerIp,
        method: req.method!,
        path: url,
        status: result.status,
        bytes: result.bytes,
        durationMs,
        upstreamMs: result.upstreamMs,
      })
    }

    if (url.charCodeAt(0) !== 47 /* '/' */) {
      const bytes = sendError(res, BAD_TARGET)
      finish({ status: 400, bytes, upstreamMs: null, error: null })
      return
    }

    const headers = upstreamRequestHeaders({
      rawHeaders: req.rawHeaders,
      headers: req.headers,
      peerIp,
      peerTrusted: trusted.has(peerIp),
      upstreamHost,
    })
    forwarder.forward(req, res, headers, finish)
  }

  const server: Server = createServer({ keepAliveTimeout: 5_000 }, handle)
  const sockets = new Set<Socket>()
  server.on('connection', (socket: Socket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
    if (socket.writable && !socket.destroyed) {
      const body = JSON.stringify({ error: ErrorCodes.BAD_REQUEST, message: 'malformed request' })
      socket.end(
        `HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
      )
    } else {
      socket.destroy()
    }
    log.debug('client error', { code: err.code })
  })

  /** While draining: once nothing is in flight, close the idle keep-alive sockets and exit. */
  function drainStep(): void {
    if (inFlight > 0) return
    for (const s of sockets) {
      // A socket with no response in progress is idle (node sets _httpMessage while one is).
      if ((s as Socket & { _httpMessage?: unknown })._httpMessage == null) s.destroy()
    }
    if (sockets.size === 0) exit()
  }

  let exiting = false
  function exit(): void {
    if (exiting) return
    exiting = true
    accessLog?.flush()
    log.info('drained, exiting')
    setTimeout(() => process.exit(0), 1_000).unref()
    void forwarder.close().finally(() => process.exit(0))
  }

  /**
   * Drain: stop accepting, let in-flight requests finish (their responses say Connection: close), then exit 0.
   * net.Server's close is used instead of http.Server's: the latter also drops idle keep-alive sockets at once,
   * which races with a client that is just sending its next request on one; here they get a short grace.
   */
  function drain(reason: string): void {
    if (draining) return
    draining = true
    log.info('draining', { reason, inFlight, timeoutMs: config.drainTimeout })
    NetServer.prototype.close.call(server)
    setTimeout(() => setInterval(drainStep, 50), 250)
    setTimeout(() => {
      log.warn('drain timeout: closing remaining connections', { inFlight })
      server.closeAllConnections()
      exit()
    }, config.drainTimeout).unref()
  }

  process.on('message', (msg: unknown) => {
    if (isMeliproxyMessage(msg) && msg.meliproxy === 'drain') drain('primary asked')
  })
  process.on('SIGTERM', () => drain('SIGTERM'))
  process.on('SIGINT', () => drain('SIGINT'))

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(config.port, config.host, () => {
      server.off('error', reject)
      resolve()
    })
  })
  log.debug('listening', { port: config.port, host: config.host })
}
