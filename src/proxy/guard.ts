import { ErrorCodes, MeliproxyError } from '../errors.js'

/**
 * What the proxy refuses before anything reaches the upstream. Node's HTTP parser (llhttp, strict mode) already
 * rejects request smuggling (Content-Length with Transfer-Encoding, differing Content-Lengths, bad chunk sizes),
 * obs-folded lines and CR/LF inside header values; those arrive as parse errors (answered by src/proxy/reply.ts
 * `parserRefusal`). The rest is checked here: the request target, the version, Transfer-Encoding read strictly from
 * the raw field lines (Node's parser accepts `,chunked` and `gzip, chunked` and reads only the last coding) and the
 * header names. The body is src/proxy/request-body.ts's.
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
 * The request line's version: HTTP/1.1 and HTTP/1.0 are served. HTTP/0.9 (a request line without a version, which
 * Node's parser accepts) is 400; any other version Node parses (HTTP/2.0 as a text request line) is 505
 * (RFC 9110 15.6.6). Null for 1.0 and 1.1.
 */
export function versionProblem(major: number, minor: number): MeliproxyError | null {
  if (major === 1 && (minor === 1 || minor === 0)) return null
  if (major === 0) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'HTTP/0.9 requests are not served')
  return new MeliproxyError(ErrorCodes.HTTP_VERSION_NOT_SUPPORTED, `HTTP/${major}.${minor} is not supported here (HTTP/1.1 and HTTP/1.0 are)`)
}

/** RFC 9110 5.6.2 token. */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/

/**
 * Why a request's Transfer-Encoding is refused, or null when it is exactly `chunked` (any case). `value` is every
 * Transfer-Encoding field line of the request joined with ", " (RFC 9110 5.3: lines of one field are one list).
 * As nginx does: an empty list element (`,chunked`) or a coding that is not a token is malformed (400); any coding
 * but chunked (`gzip, chunked`, `cunked`) is one this proxy does not implement (501, RFC 9112 6.1); `chunked` twice
 * or with parameters is malformed (400). RFC 9110 5.6.1 lets a recipient skip empty elements; a proxy that forwards the request
 * must not read it differently from the next hop, so here they are refused.
 */
export function transferCodingProblem(value: string): MeliproxyError | null {
  if (value.length === 7 && value.toLowerCase() === 'chunked') return null
  const codings = value.split(',')
  for (const raw of codings) {
    const coding = raw.trim()
    if (coding === '') return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'empty element in Transfer-Encoding')
    const semi = coding.indexOf(';')
    const name = semi === -1 ? coding : coding.slice(0, semi).trimEnd()
    if (!TOKEN.test(name)) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'malformed Transfer-Encoding')
  }
  const names = codings.map((c) => c.trim().toLowerCase())
  for (const name of names) {
    const coding = name.split(';', 1)[0]!.trimEnd()
    if (coding !== 'chunked') {
      return new MeliproxyError(ErrorCodes.UNKNOWN_TRANSFER_CODING, `transfer coding "${coding.slice(0, 32)}" is not implemented (only chunked is)`)
    }
  }
  if (names.length > 1) return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'chunked must be applied once')
  if (names[0] !== 'chunked') return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'chunked takes no parameters')
  return null
}

/**
 * Why a request carrying Transfer-Encoding is refused, or null when its framing is exactly `chunked` in HTTP/1.1.
 * In an HTTP/1.0 request Transfer-Encoding is faulty framing (RFC 9112 6.1: an HTTP/1.0 recipient may not know it,
 * and the message must not be relied on); nginx answers 400, and so does this proxy, whatever the coding.
 */
export function transferEncodingProblem(rawHeaders: readonly string[], httpVersion: string): MeliproxyError | null {
  if (httpVersion !== '1.1') return new MeliproxyError(ErrorCodes.BAD_REQUEST, 'Transfer-Encoding in an HTTP/1.0 request')
  return transferCodingProblem(transferEncoding(rawHeaders) ?? '')
}

/** Every Transfer-Encoding field line of a request (`rawHeaders`, as sent), joined with ", "; null when there is none. */
export function transferEncoding(rawHeaders: readonly string[]): string | null {
  let value: string | null = null
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!
    if (name.length === 17 && name.toLowerCase() === 'transfer-encoding') value = value === null ? rawHeaders[i + 1]! : `${value}, ${rawHeaders[i + 1]!}`
  }
  return value
}

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

/**
 * With `--headers-with-underscores drop`: removes the fields whose name has `_` from a request's parsed headers, so
 * that nothing downstream (limit keys, cache keys, the forwarded request) reads them, as nginx's
 * `underscores_in_headers off` ignores them. Returns how many were removed (0, with no allocation, for nearly every
 * request).
 */
export function dropUnderscored(rawHeaders: readonly string[], headers: Record<string, unknown>): number {
  let dropped = 0
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!
    if (name.includes('_')) {
      delete headers[name.toLowerCase()]
      dropped++
    }
  }
  return dropped
}
