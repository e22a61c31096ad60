import { BodyTooLargeError, ErrorCodes, MeliproxyError } from '../errors.js'
import type { Limiter } from '../limiter/limiter.js'
import { headerProblem, targetProblem } from '../proxy/guard.js'
import type { UnderscoreAction } from '../proxy/guard.js'
import type { Stage } from './pipeline.js'

/** The guard's part of the configuration (built at the edge, src/options.ts). */
export interface GuardOptions {
  readonly maxUrlLength: number
  readonly maxBodySize: number
  readonly headersWithUnderscores: UnderscoreAction
}

const FORBIDDEN = new MeliproxyError(ErrorCodes.FORBIDDEN, 'this client is not allowed')

/**
 * What is refused before anything else: a bad target, bad or duplicate Host and (as configured) header names with
 * `_`, a declared body over the limit, a client on the deny list. Each but the deny list closes the connection: a
 * client that sends this gets no second chance on it (and a refused body is not read).
 */
export function guardStage(config: GuardOptions, limiter: Limiter): Stage {
  return (x, p) => {
    const bad =
      targetProblem(x.url, config.maxUrlLength) ?? headerProblem(x.req.rawHeaders, x.req.httpVersion, config.headersWithUnderscores)
    if (bad !== null) {
      x.res.shouldKeepAlive = false
      return p.reject(x, bad)
    }
    const length = x.headers['content-length']
    if (length !== undefined && Number(length) > config.maxBodySize) {
      x.res.shouldKeepAlive = false
      return p.reject(x, new BodyTooLargeError(config.maxBodySize))
    }
    if (limiter.rules.denies(x.ip)) return p.reject(x, FORBIDDEN)
    p.next(x)
  }
}
