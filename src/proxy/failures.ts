import { MeliproxyError, UpstreamError, UpstreamTimeoutError, UpstreamUnreachableError } from '../errors.js'
import type { Outcome } from './breakers.js'

/** What an undici or socket failure means: for the client's answer, the breakers and the retries. */

const UNREACHABLE = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EPIPE',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
])
const TIMEOUT = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'ETIMEDOUT'])

function codeOf(err: Error): string {
  return (err as NodeJS.ErrnoException).code ?? ''
}

/** True when no connection to the upstream could be made or kept (refused, reset, DNS): a retry may help. */
export function unreachable(err: Error): boolean {
  return UNREACHABLE.has(codeOf(err))
}

/**
 * What a failed attempt says: the upstream is gone (no connection, or one refused or reset before any response) or
 * the route is sick (it timed out, or failed once it had started answering).
 */
export function failureOutcome(err: Error, answered: boolean): Outcome {
  const code = codeOf(err)
  if (!answered && (UNREACHABLE.has(code) || code === 'UND_ERR_CONNECT_TIMEOUT')) return 'upstream'
  return TIMEOUT.has(code) ? 'route-timeout' : 'route'
}

/** Translates an undici/socket error into ours (502 or 504); ours (a body over the limit, an open breaker) stay. */
export function toUpstreamError(err: Error): MeliproxyError {
  if (err instanceof MeliproxyError) return err
  const code = codeOf(err)
  if (TIMEOUT.has(code)) return new UpstreamTimeoutError(`upstream did not answer in time (${code})`)
  if (UNREACHABLE.has(code)) return new UpstreamUnreachableError(`upstream unreachable (${code})`)
  return new UpstreamError(`upstream request failed (${code || err.name})`)
}
