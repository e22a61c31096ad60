import { createHash, timingSafeEqual } from 'node:crypto'
import type { IncomingHttpHeaders } from 'node:http'
import { ErrorCodes, MeliproxyError } from '../errors.js'

/**
 * Bearer-token checks for the admin API. Tokens are compared as SHA-256 digests with timingSafeEqual, so the
 * comparison takes the same time whatever the token's length or content.
 */


const digest = (s: string): Buffer => createHash('sha256').update(s).digest()

/** Checks `Authorization: Bearer <token>` against the configured token: why the request is refused, or null. */
export function checkBearer(headers: IncomingHttpHeaders, token: string | null): MeliproxyError | null {
  if (token === null) return new MeliproxyError(ErrorCodes.ADMIN_TOKEN_UNSET, 'start meliproxy with --admin-token to use this endpoint')
  const header = headers.authorization
  const m = typeof header === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null
  if (m === null) return new MeliproxyError(ErrorCodes.UNAUTHORIZED, 'send Authorization: Bearer <admin token>')
  if (!timingSafeEqual(digest(m[1]!), digest(token))) return new MeliproxyError(ErrorCodes.UNAUTHORIZED, 'the admin token is not valid')
  return null
}
