import type { IncomingMessage } from 'node:http'
import { Transform, type Readable } from 'node:stream'
import { BodyTooLargeError, ClientAbortError, ErrorCodes, MeliproxyError } from '../errors.js'

/**
 * What the proxy refuses before anything reaches the upstream. Node's HTTP parser (llhttp, strict mode) already
 * rejects request smuggling (Content-Length with Transfer-Encoding, differing Content-Lengths, bad chunk sizes),
 * obs-folded lines and CR/LF inside header values; those arrive as parse errors (answered by src/proxy/reply.ts `parserRefusal`). The
 * rest is checked on the request target and the body.
 */

const BAD_PERCENT = /%(?![0-9A-Fa-f]{2})/
const DOT_SEGMENT = /^(\.|%2e){1,2}$/i

/** Why a request target is refused, or null when it is fine. */
export function targetProblem(url: string, maxLength: number): MeliproxyError | null {
  if (url.length > maxLength) {
    return new MeliproxyError(ErrorCodes.URI_TOO_LONG, `the request target is over ${maxLength} characters`)
  }
  if (url.charCodeAt(0) !== 47 /* '/' */) {
    return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'request target must be a path (origin-form)')
  }
  if (BAD_PERCENT.test(url)) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'invalid percent-encoding in the request target')
  const q = url.indexOf('?')
  const path = q === -1 ? url : url.slice(0, q)
  if (path.includes('.') || path.includes('%')) {
    for (const segment of path.split('/')) {
      if (DOT_SEGMENT.test(segment)) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'dot segments (. or ..) are not allowed in the path')
    }
  }
  return null
}

/** What `--headers-with-underscores` does with a field name containing `_`. */
export type UnderscoreAction = 'allow' | 'drop' | 'reject'

/**
 * Header checks the parser leaves to us: more than one Host (RFC 9112 3.2: 400), no Host in HTTP/1.1 (400), and
 * field names with `_` when the operator rejects them (some backends read `Transfer_Encoding` as
 * `Transfer-Encoding`). Null when the headers are fine.
 */
export function headerProblem(rawHeaders: readonly string[], httpVersion: string, underscores: UnderscoreAction): MeliproxyError | null {
  let hosts = 0
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!
    if (name.length === 4 && name.toLowerCase() === 'host') hosts++
    else if (underscores === 'reject' && name.includes('_')) {
      return new MeliproxyError(ErrorCodes.BAD_REQUEST, `header field names with "_" are refused here (${name.slice(0, 64)})`)
    }
  }
  if (hosts > 1) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'more than one Host header field')
  if (hosts === 0 && httpVersion === '1.1') return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'an HTTP/1.1 request needs a Host header field')
  return null
}

/** The request body, failing with BodyTooLargeError once more than `max` bytes arrived (for bodies without a length). */
export function limitedBody(req: IncomingMessage, max: number): Readable {
  let seen = 0
  const limited = new Transform({
    transform(chunk: Buffer, _enc, done) {
      seen += chunk.length
      if (seen > max) done(new BodyTooLargeError(max))
      else done(null, chunk)
    },
  })
  req.on('error', (err) => limited.destroy(err))
  req.on('aborted', () => limited.destroy(new ClientAbortError()))
  return req.pipe(limited)
}
