import type { IncomingMessage, ServerResponse } from 'node:http'
import type { RequestFacts } from './limiter/rules.js'
import { clientIp } from './net/client-ip.js'
import { normalizeIp, type IpSet } from './net/ip.js'

/** One request as it moves through the worker. */
export class Exchange implements RequestFacts {
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
  /** Set once the pipeline recorded it. */
  finished = false
  /** The error code the proxy refused it with (guards), for the access log. */
  reason: string | undefined = undefined
  /** X-Cache value it was answered with (HIT, MISS, STALE, BYPASS), for the access log. */
  cache: string | undefined = undefined

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

