import type { Dispatcher } from 'undici'
import type { Exchange } from '../exchange.js'
import type { IpSet } from '../net/ip.js'
import type { RoutedRequest } from '../proxy/breaker-interceptor.js'
import { upstreamRequestHeaders } from '../proxy/headers.js'
import { Relay } from '../proxy/relay.js'
import type { RouteNamer } from '../stats/routes.js'
import type { UnderscoreAction } from '../proxy/guard.js'
import type { Stage } from './pipeline.js'

/** What forwarding needs of the configuration (built at the edge, src/options.ts). */
export interface UpstreamOptions {
  /** The upstream's origin (scheme, host, port). */
  readonly upstream: string
  readonly maxBodySize: number
  readonly headersWithUnderscores: UnderscoreAction
}

/**
 * Sending an exchange upstream through the composed dispatcher (src/proxy/upstream-dispatcher.ts: pool, breakers,
 * retries): the forwarded request's headers (RFC 9110 rewriting, a cache's validators in place of the client's), its
 * body (read whole or streaming, as src/pipeline/body.ts prepared it) and the route name the breakers
 * use. The upstream stage forwards the client's request; the cache refreshes in the background through it too.
 */
export class Upstream {
  readonly #config: UpstreamOptions
  readonly #dispatch: Dispatcher.Dispatch
  readonly #trusted: IpSet
  readonly #routes: RouteNamer
  readonly #host: string
  readonly #origin: string

  constructor(config: UpstreamOptions, dispatcher: Dispatcher, trusted: IpSet, routes: RouteNamer) {
    this.#config = config
    // Taken once: the composed dispatcher's dispatch needs no `this` (and is a property lookup through undici's proxy).
    this.#dispatch = dispatcher.dispatch
    this.#trusted = trusted
    this.#routes = routes
    this.#origin = config.upstream
    this.#host = new URL(config.upstream).host
  }

  /** Sends the client's request upstream with the body the body stage prepared; `validators` (if any) replace the client's. */
  forward(x: Exchange, handler: Dispatcher.DispatchHandler, validators: string[] | null): void {
    x.forwarded = true
    this.#send(x, handler, validators, x.body)
  }

  /** Sends the request again without its body, for the cache's background refresh. */
  refresh(x: Exchange, handler: Dispatcher.DispatchHandler, validators: string[] | null): void {
    this.#send(x, handler, validators, null)
  }

  #send(x: Exchange, handler: Dispatcher.DispatchHandler, validators: string[] | null, body: RoutedRequest['body']): void {
    let headers = upstreamRequestHeaders({
      rawHeaders: x.req.rawHeaders,
      headers: x.headers,
      peerIp: x.peer,
      peerTrusted: this.#trusted.has(x.peer),
      upstreamHost: this.#host,
      dropUnderscored: this.#config.headersWithUnderscores === 'drop',
    })
    if (validators !== null) {
      const kept: string[] = []
      for (let i = 0; i < headers.length; i += 2) {
        const n = headers[i]!.toLowerCase()
        if (n !== 'if-none-match' && n !== 'if-modified-since') kept.push(headers[i]!, headers[i + 1]!)
      }
      headers = kept.concat(validators)
    }
    const request: RoutedRequest = {
      origin: this.#origin,
      path: x.url,
      method: x.method as Dispatcher.HttpMethod,
      headers,
      body,
      route: this.#routes.name(x.path),
    }
    this.#dispatch(request, handler)
  }
}

/**
 * The last stage: the request goes upstream and the answer to the client (src/proxy/relay.ts), through what an
 * earlier stage hung on the exchange to watch it (the cache's fill).
 */
export function upstreamStage(upstream: Upstream): Stage {
  return (x) => {
    const relay = new Relay(x)
    const tap = x.tap
    if (tap === null) upstream.forward(x, relay, null)
    else upstream.forward(x, tap.wrap(relay), tap.validators)
  }
}
