import { createHash, timingSafeEqual } from 'node:crypto'
import type { IncomingHttpHeaders } from 'node:http'

/**
 * Bearer-token checks for the admin API. Tokens are compared as SHA-256 digests with timingSafeEqual, so the
 * comparison takes the same time whatever the token's length or content.
 */

/** Why a request was refused, or null when it may go on. */
export type AuthFailure = { status: 401 | 403; error: string; message: string } | null

const digest = (s: string): Buffer => createHash('sha256').update(s).digest()

/** Checks `Authorization: Bearer <token>` against the configured token. */
export function checkBearer(headers: IncomingHttpHeaders, token: string | null): AuthFailure {
  if (token === null) {
    return { status: 403, error: 'admin_token_unset', message: 'start meliproxy with --admin-token to use this endpoint' }
  }
  const header = headers.authorization
  const m = typeof header === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null
  if (m === null) return { status: 401, error: 'unauthorized', message: 'send Authorization: Bearer <admin token>' }
  if (!timingSafeEqual(digest(m[1]!), digest(token))) return { status: 401, error: 'unauthorized', message: 'the admin token is not valid' }
  return null
}
