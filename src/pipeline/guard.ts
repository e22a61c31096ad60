import { BodyTooLargeError, ErrorCodes, MeliproxyError } from '../errors.js'
import type { Limiter } from '../limiter/limiter.js'
import { dropUnderscored, headerProblem, targetProblem, transferEncodingProblem, versionProblem } from '../proxy/guard.js'
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
 * What is refused before anything else: a version other than HTTP/1.1 and 1.0, a Transfer-Encoding that is not exactly
 * `chunked` (or any in HTTP/1.0), a bad target, bad or duplicate Host and (as configured) header names with `_`, a
 * declared body over the limit, a client on the deny list. Each but the deny list closes the connection: a client that sends this gets no
 * second chance on it (and a refused body is not read). With `--headers-with-underscores drop`, fields named with `_`
 * are removed here, before any stage reads the headers.
 */
export function guardStage(config: GuardOptions, limiter: Limiter): Stage {
  const drop = config.headersWithUnderscores === 'drop'
  return (x, p) => {
    const req = x.req
    const bad =
      versionProblem(req.httpVersionMajor, req.httpVersionMinor) ??
      (x.headers['transfer-encoding'] === undefined ? null : transferEncodingProblem(req.rawHeaders, req.httpVersion)) ??
      targetProblem(x.url, config.maxUrlLength) ??
      headerProblem(req.rawHeaders, req.httpVersion, config.headersWithUnderscores)
    if (bad !== null) {
      x.res.shouldKeepAlive = false
      return p.reject(x, bad)
    }
    if (drop) dropUnderscored(req.rawHeaders, x.headers)
    const length = x.headers['content-length']
    if (length !== undefined && Number(length) > config.maxBodySize) {
      x.res.shouldKeepAlive = false
      return p.reject(x, new BodyTooLargeError(config.maxBodySize))
    }
    if (limiter.rules.denies(x.ip)) return p.reject(x, FORBIDDEN)
    p.next(x)
  }
}
