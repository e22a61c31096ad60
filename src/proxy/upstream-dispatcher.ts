import { Pool, type Dispatcher } from 'undici'
import { breakerInterceptor } from './breaker-interceptor.js'
import type { Breakers } from './breakers.js'
import { retryInterceptor, type RetryPolicy } from './retry.js'

/** Upstream timeouts, in milliseconds. */
export interface UpstreamTimeouts {
  readonly connect: number
  readonly headers: number
  readonly body: number
}

/** How the upstream is protected: breakers, and the retry policy. */
export interface UpstreamProtection extends RetryPolicy {
  readonly breakers: Breakers
  readonly onRefused: () => void
}

/**
 * The upstream as one undici dispatcher: a keep-alive Pool for the origin, composed with the breakers (each attempt
 * asks them) inside the retries (a retry is a fresh attempt): `pool.compose(breakers, retry)`, the last one outermost
 * (undici's Dispatcher#compose).
 */
export function upstreamDispatcher(origin: string, timeouts: UpstreamTimeouts, protection: UpstreamProtection): Dispatcher {
  const pool = new Pool(origin, {
    connect: { timeout: timeouts.connect },
    headersTimeout: timeouts.headers,
    bodyTimeout: timeouts.body,
    keepAliveTimeout: 4_000,
  })
  const interceptors: Dispatcher.DispatcherComposeInterceptor[] = []
  if (protection.breakers.enabled) interceptors.push(breakerInterceptor(protection.breakers, protection.onRefused))
  interceptors.push(retryInterceptor(protection))
  return pool.compose(interceptors)
}
