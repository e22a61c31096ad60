import type { IncomingMessage } from 'node:http'
import { Transform, type Readable } from 'node:stream'
import { BodyTooLargeError, ErrorCodes, MeliproxyError } from '../errors.js'

/**
 * What the proxy refuses before anything reaches the upstream. Node's HTTP parser (llhttp, strict mode) already
 * rejects request smuggling (Content-Length with Transfer-Encoding, differing Content-Lengths, bad chunk sizes),
 * obs-folded lines and CR/LF inside header values; those arrive here as parse errors (`clientErrorResponse`). The
 * rest is checked on the request target and the body.
 */

const BAD_PERCENT = /%(?![0-9A-Fa-f]{2})/
const DOT_SEGMENT = /^(\.|%2e){1,2}$/i

/** Why a request target is refused, or null when it is fine. */
export function targetProblem(url: string, maxLength: number): MeliproxyError | null {
  if (url.length > maxLength) {
    return new MeliproxyError(ErrorCodes.URI_TOO_LONG, 414, `the request target is over ${maxLength} characters`)
  }
  if (url.charCodeAt(0) !== 47 /* '/' */) {
    return new MeliproxyError(ErrorCodes.BAD_REQUEST, 400, 'request target must be a path (origin-form)')
  }
  if (BAD_PERCENT.test(url)) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 400, 'invalid percent-encoding in the request target')
  const q = url.indexOf('?')
  const path = q === -1 ? url : url.slice(0, q)
  if (path.includes('.') || path.includes('%')) {
    for (const segment of path.split('/')) {
      if (DOT_SEGMENT.test(segment)) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 400, 'dot segments (. or ..) are not allowed in the path')
    }
  }
  return null
}

/** The raw response to a request the parser refused (`clientError`), with Connection: close. */
export function clientErrorResponse(code: string | undefined): string {
  let status = '400 Bad Request'
  let body: { error: string; message: string } = { error: ErrorCodes.BAD_REQUEST, message: 'malformed request' }
  if (code === 'HPE_HEADER_OVERFLOW') {
    status = '431 Request Header Fields Too Large'
    body = { error: ErrorCodes.HEADERS_TOO_LARGE, message: 'the request line and headers are too large' }
  } else if (code === 'ERR_HTTP_REQUEST_TIMEOUT') {
    status = '408 Request Timeout'
    body = { error: ErrorCodes.REQUEST_TIMEOUT, message: 'the request did not arrive in time' }
  }
  const text = JSON.stringify(body)
  return `HTTP/1.1 ${status}\r\ncontent-type: application/json\r\ncontent-length: ${text.length}\r\nconnection: close\r\n\r\n${text}`
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
  req.on('aborted', () => limited.destroy(new Error('client aborted the upload')))
  return req.pipe(limited)
}
