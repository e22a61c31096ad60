import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Readable } from 'node:stream'
import type { Dispatcher } from 'undici'
import type { MeliproxyError } from './errors.js'
import type { RequestFacts } from './limiter/rules.js'
import { clientIp } from './net/client-ip.js'
import { normalizeIp, type IpSet } from './net/ip.js'

/**
 * What an exchange's answer was, whoever gave it (a refusal, a 429, a cache hit, the upstream): what recording reads
 * once the response ended (src/pipeline/record.ts). The writes in src/proxy/reply.ts keep it.
 */
export interface ExchangeResult {
  /** Status sent to the client; 0 when the client went away before its answer was complete. */
  status: number
  /** Body bytes written to the client. */
  bytes: number
  /** Milliseconds from sending upstream to the end of the upstream's answer; null when the upstream did not answer it. */
  upstreamMs: number | null
  /** The upstream failure (or open breaker) the answer reports, if any. */
  error: MeliproxyError | null
}

/** Told when the client leaves while its exchange is upstream (src/proxy/relay.ts; the cache's fill may veto). */
export interface Departure {
  clientLeft(): void
}

/**
 * A stage's wish for the upstream answer (the cache's fill, src/cache/fill.ts): a handler decorator around the one
 * that relays the answer to the client, and the validators to send instead of the client's.
 */
export interface UpstreamTap {
  wrap(client: Dispatcher.DispatchHandler): Dispatcher.DispatchHandler
  readonly validators: string[] | null
}

/** One request as it moves through the worker. */
export class Exchange implements RequestFacts, ExchangeResult {
  readonly started = performance.now()
  readonly time = Date.now()
  readonly url: string
  readonly path: string
  readonly method: string
  readonly headers: IncomingMessage['headers']
  readonly peer: string
  readonly ip: string
  /** RateLimit-* fields to add to the response. */
  rateHeaders: string[] | null = null
  /** The rule that rejected it, for the access log. */
  limitedBy: string | undefined = undefined
  /** A shadow rule that would have rejected it (it did not), for statistics and the access log. */
  shadowLimitedBy: string | undefined = undefined
  /** Index of the pipeline stage it goes to next (src/pipeline/pipeline.ts). */
  stage = 0
  /** Set once it is recorded (src/proxy/reply.ts: once, from the response's close or its connection's). */
  recorded = false
  /** The error code the proxy refused it with (guards), for the access log. */
  reason: string | undefined = undefined
  /** X-Cache value it was answered with (HIT, MISS, STALE, BYPASS), for the access log and the answer. */
  cache: string | undefined = undefined
  /** Set by the cache stage for the upstream stage: what watches the upstream's answer. */
  tap: UpstreamTap | null = null
  /** The request body for the upstream, as the body stage left it: read whole, streaming, or none. */
  body: Buffer | Readable | null = null
  /** Set once the request was handed to the upstream: from then on it is not a refusal, whatever happens. */
  forwarded = false
  /** Set when the server answered it on the raw socket (the parser refused its body, or it timed out). */
  answeredRaw = false
  /** What to tell while the exchange is upstream and its client leaves. */
  departure: Departure | null = null
  // ExchangeResult: kept by src/proxy/reply.ts and the relay.
  status = 0
  bytes = 0
  upstreamMs: number | null = null
  error: MeliproxyError | null = null

  constructor(
    readonly req: IncomingMessage,
    readonly res: ServerResponse,
    trusted: IpSet,
  ) {
    this.url = req.url!
    const q = this.url.indexOf('?')
    this.path = q === -1 ? this.url : this.url.slice(0, q)
    this.method = req.method!
    this.headers = req.headers
    this.peer = normalizeIp(req.socket.remoteAddress ?? '')
    this.ip = clientIp(this.peer, req.headers['x-forwarded-for'], trusted)
  }
}
