import { ErrorCodes, errorBody, MeliproxyError } from '../errors.js'
import type { Verdict } from './limiter.js'

/**
 * What a client sees of the limiter: RateLimit-Limit/-Remaining/-Reset for the rule nearest exhaustion
 * (draft-ietf-httpapi-ratelimit-headers, the widely deployed revision), RateLimit-Policy for that rule, and on
 * rejection 429 with Retry-After and a JSON body.
 */

/** The RateLimit-* header fields (flat [name, value, ...]) for a verdict. */
export function rateLimitHeaders(v: Verdict): string[] {
  return [
    'ratelimit-limit', v.rule.limitText,
    'ratelimit-remaining', String(v.remaining),
    'ratelimit-reset', String(Math.max(0, Math.ceil(v.resetMs / 1000))),
    'ratelimit-policy', v.rule.policy,
  ]
}

/** Seconds a rejected client should wait. */
export function retryAfterSeconds(v: Verdict): number {
  return Math.max(1, Math.ceil(v.resetMs / 1000))
}

/** The 429 body. */
export function rejectionBody(v: Verdict): string {
  const s = retryAfterSeconds(v)
  const err = new MeliproxyError(ErrorCodes.RATE_LIMITED, `rate limit "${v.rule.name}" (${v.rule.limit} per ${v.rule.spec.window}) exceeded; retry in ${s}s`)
  return errorBody(err, { rule: v.rule.name, retryAfter: s })
}
