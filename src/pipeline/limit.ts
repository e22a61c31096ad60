import type { Exchange } from '../exchange.js'
import type { Limiter, Verdict } from '../limiter/limiter.js'
import { rateLimitHeaders, rejectionBody, retryAfterSeconds } from '../limiter/response.js'
import type { Logger } from '../log.js'
import { answered } from '../proxy/forward.js'
import type { Pipeline, Stage } from './pipeline.js'

/**
 * The rate limits: a request no rule governs goes on at once; one whose tokens are in hand is decided
 * synchronously; one that needs a lease waits for it. Admitted requests carry RateLimit-* fields; rejected ones get
 * 429 and never reach the cache or the upstream.
 */
export function limitStage(limiter: Limiter, log: Logger): Stage {
  function decided(x: Exchange, p: Pipeline, v: Verdict): void {
    if (x.res.destroyed) return p.finish(x, answered(0, 0)) // the client left while it waited
    if (v.allowed) {
      x.rateHeaders = rateLimitHeaders(v)
      return p.next(x)
    }
    x.limitedBy = v.rule.name
    const body = rejectionBody(v)
    const headers = rateLimitHeaders(v)
    headers.push('retry-after', String(retryAfterSeconds(v)), 'content-type', 'application/json')
    headers.push('content-length', String(Buffer.byteLength(body)))
    x.res.writeHead(429, headers)
    x.res.end(body)
    p.finish(x, answered(429, Buffer.byteLength(body)))
  }

  return (x, p) => {
    const verdict = limiter.check(x)
    if (verdict === null) return p.next(x)
    if (!(verdict instanceof Promise)) return decided(x, p, verdict)
    verdict.then(
      (v) => decided(x, p, v),
      (err: Error) => {
        // The limiter's pools never reject (Redis failures fall back); this is a bug, not the client's problem.
        log.error('limiter failed; request let through', { error: err.message })
        p.next(x)
      },
    )
  }
}
