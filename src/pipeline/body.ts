import { BodyTooLargeError } from '../errors.js'
import type { Exchange } from '../exchange.js'
import { readBody, streamBody, type SlowBodies } from '../proxy/request-body.js'
import type { Pipeline, Stage } from './pipeline.js'

/** The body stage's part of the configuration (built at the edge, src/options.ts). */
export interface BodyOptions {
  /** Bodies up to this many bytes are read whole before going on; 0: every body streams. */
  readonly requestBuffering: number
  readonly maxBodySize: number
}

/** What the body stage counts. */
export interface BodyCounts {
  /** A body read whole before going on. */
  buffered(): void
  /** A body streamed upstream as it arrives. */
  streamed(): void
}

/**
 * The request body, before the cache and the upstream see the request (src/proxy/request-body.ts): a request without
 * one (no Content-Length or `Content-Length: 0`, no Transfer-Encoding: every plain GET) goes on at once. A body of up to
 * --request-buffering bytes is read whole first, so the upstream never hears of a client too slow to send it and a
 * body the parser refuses (a bad chunk) is refused before any answer, a cached one included. A larger one, or any
 * with --request-buffering 0, streams upstream watched for --request-body-min-rate.
 */
export function bodyStage(config: BodyOptions, slow: SlowBodies, counts: BodyCounts): Stage {
  const buffer = config.requestBuffering
  const max = config.maxBodySize

  function stream(x: Exchange, p: Pipeline, prefix: Buffer[], declared: boolean): void {
    counts.streamed()
    x.body = streamBody(x.req, prefix, declared ? null : max, slow)
    p.next(x)
  }

  return (x, p) => {
    const length = x.headers['content-length']
    const chunked = x.headers['transfer-encoding'] !== undefined
    if (!chunked && (length === undefined || length === '0')) return p.next(x)
    if (buffer === 0 || (!chunked && Number(length) > buffer)) return stream(x, p, [], !chunked)
    readBody(x.req, buffer, max, {
      whole(body) {
        counts.buffered()
        x.body = body
        if (!x.res.destroyed) p.next(x)
      },
      overflow: (prefix) => stream(x, p, prefix, false),
      tooLarge() {
        p.reject(x, new BodyTooLargeError(max))
      },
    })
  }
}
