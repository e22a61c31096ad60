import type { Config } from '../config.js'
import type { FetchOptions } from '../cache/http-cache.js'
import type { Exchange } from '../exchange.js'
import type { IpSet } from '../net/ip.js'
import type { ForwardDone, Forwarder } from '../proxy/forward.js'
import { limitedBody } from '../proxy/guard.js'
import { upstreamRequestHeaders } from '../proxy/headers.js'
import type { RouteNamer } from '../stats/routes.js'

/**
 * Sending an exchange upstream: the forwarded request's headers (RFC 9110 rewriting, the cache's validators in place
 * of the client's on a revalidation), its body (counted against --max-body-size as it streams when it has no
 * declared length) and the route name the breakers use. The forward stage and the cache both fetch through it.
 */
export class Upstream {
  readonly #config: Config
  readonly #forwarder: Forwarder
  readonly #trusted: IpSet
  readonly #routes: RouteNamer
  readonly #host: string

  constructor(config: Config, forwarder: Forwarder, trusted: IpSet, routes: RouteNamer) {
    this.#config = config
    this.#forwarder = forwarder
    this.#trusted = trusted
    this.#routes = routes
    this.#host = new URL(config.upstream).host
  }

  /** Sends `x` upstream as `opts` say; `done` runs once. */
  fetch(x: Exchange, opts: FetchOptions, done: ForwardDone): void {
    let headers = upstreamRequestHeaders({
      rawHeaders: x.req.rawHeaders,
      headers: x.headers,
      peerIp: x.peer,
      peerTrusted: this.#trusted.has(x.peer),
      upstreamHost: this.#host,
      dropUnderscored: this.#config.headersWithUnderscores === 'drop',
    })
    if (opts.conditional !== null) {
      const kept: string[] = []
      for (let i = 0; i < headers.length; i += 2) {
        const n = headers[i]!.toLowerCase()
        if (n !== 'if-none-match' && n !== 'if-modified-since') kept.push(headers[i]!, headers[i + 1]!)
      }
      headers = kept.concat(opts.conditional)
    }
    const hasBody = opts.toClient && (x.headers['content-length'] !== undefined || x.headers['transfer-encoding'] !== undefined)
    // A body without a declared length is counted as it streams (one with a length was checked by the guard).
    const body = !hasBody ? null : x.headers['content-length'] === undefined ? limitedBody(x.req, this.#config.maxBodySize) : x.req
    let extra: readonly string[] | null = x.rateHeaders
    if (opts.extraHeaders !== null) extra = extra === null ? opts.extraHeaders : extra.concat(opts.extraHeaders)
    this.#forwarder.forward(
      { method: x.method, path: x.url, route: this.#routes.name(x.path), headers, body },
      opts.toClient ? x.res : null,
      extra,
      opts.tap,
      done,
    )
  }
}
