/**
 * Every error meliproxy raises on purpose, each with a stable code.
 * Clients see `{"error": "<code>", "message": "..."}`; the CLI prints one line and exits 2 on ConfigError.
 */

/**
 * The registry: every error code a client or an operator can see, declared once with its HTTP status (fastify's
 * createError shape). The README's error lists are checked against it by test/unit/errors.test.ts.
 */
export const ERRORS = {
  config_invalid: 500, // the CLI's: exit code 2 and one line, never an HTTP answer
  // the proxy's answers
  upstream_unreachable: 502,
  upstream_timeout: 504,
  upstream_error: 502,
  upstream_circuit_open: 503,
  route_circuit_open: 503,
  bad_request: 400,
  forbidden: 403,
  method_not_allowed: 405,
  request_timeout: 408,
  body_too_large: 413,
  uri_too_long: 414,
  rate_limited: 429,
  headers_too_large: 431,
  unknown_transfer_coding: 501, // a Transfer-Encoding other than chunked (RFC 9112 6.1)
  http_version_not_supported: 505, // a request line of HTTP/2.0 or another version than 1.0 and 1.1
  not_cached: 504, // only-if-cached and nothing usable is stored (RFC 9111 5.2.1.7)
  limiter_unavailable: 503, // a whenRedisDown: deny rule while Redis is unreachable
  // the admin API's
  invalid_json: 400,
  invalid_rules: 400,
  unauthorized: 401,
  admin_token_unset: 403,
  not_found: 404,
  stats_disabled: 404,
  redis_unavailable: 503,
  internal: 500,
} as const

/** One of the stable codes above. */
export type ErrorCode = keyof typeof ERRORS

/** The codes by name, for code that wants a constant (ErrorCodes.BAD_REQUEST === 'bad_request'). */
export const ErrorCodes = {
  CONFIG_INVALID: 'config_invalid',
  UPSTREAM_UNREACHABLE: 'upstream_unreachable',
  UPSTREAM_TIMEOUT: 'upstream_timeout',
  UPSTREAM_ERROR: 'upstream_error',
  UPSTREAM_CIRCUIT_OPEN: 'upstream_circuit_open',
  ROUTE_CIRCUIT_OPEN: 'route_circuit_open',
  BAD_REQUEST: 'bad_request',
  FORBIDDEN: 'forbidden',
  METHOD_NOT_ALLOWED: 'method_not_allowed',
  REQUEST_TIMEOUT: 'request_timeout',
  BODY_TOO_LARGE: 'body_too_large',
  URI_TOO_LONG: 'uri_too_long',
  RATE_LIMITED: 'rate_limited',
  HEADERS_TOO_LARGE: 'headers_too_large',
  UNKNOWN_TRANSFER_CODING: 'unknown_transfer_coding',
  HTTP_VERSION_NOT_SUPPORTED: 'http_version_not_supported',
  NOT_CACHED: 'not_cached',
  LIMITER_UNAVAILABLE: 'limiter_unavailable',
  INVALID_JSON: 'invalid_json',
  INVALID_RULES: 'invalid_rules',
  UNAUTHORIZED: 'unauthorized',
  ADMIN_TOKEN_UNSET: 'admin_token_unset',
  NOT_FOUND: 'not_found',
  STATS_DISABLED: 'stats_disabled',
  REDIS_UNAVAILABLE: 'redis_unavailable',
  INTERNAL: 'internal',
} as const satisfies Record<string, ErrorCode>

/** Base class: a code, its HTTP status (from the registry), a message safe to show, and the field it is about. */
export class MeliproxyError extends Error {
  readonly code: ErrorCode
  readonly status: number
  readonly field: string | undefined
  constructor(code: ErrorCode, message: string, field?: string) {
    super(message)
    this.name = new.target.name
    this.code = code
    this.status = ERRORS[code]
    this.field = field
  }

  /** The JSON body a client receives for this error. */
  toJSON(): { error: ErrorCode; message: string; field?: string } {
    return this.field === undefined ? { error: this.code, message: this.message } : { error: this.code, message: this.message, field: this.field }
  }
}

/** The one way an error body is written: JSON with the code, the message, the field if any, and `extra` fields. */
export function errorBody(err: MeliproxyError, extra?: Record<string, unknown>): string {
  return JSON.stringify(extra === undefined ? err.toJSON() : { ...err.toJSON(), ...extra })
}

/** A bad option from a flag, the environment or the config file; names the field and the value. */
export class ConfigError extends MeliproxyError {
  declare readonly field: string
  constructor(field: string, message: string) {
    super(ErrorCodes.CONFIG_INVALID, `${field}: ${message}`, field)
  }
}

/** The upstream could not be reached (refused, DNS, reset before a response): 502. */
export class UpstreamUnreachableError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.UPSTREAM_UNREACHABLE, message)
  }
}

/** The upstream did not answer (or stalled mid-body) within the configured timeout: 504. */
export class UpstreamTimeoutError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.UPSTREAM_TIMEOUT, message)
  }
}

/** Any other upstream failure before a response started: 502. */
export class UpstreamError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.UPSTREAM_ERROR, message)
  }
}

/**
 * A circuit breaker is open: 503 with Retry-After, and the upstream is not asked for a while. `route` names the sick
 * route when only its breaker is open; null when the upstream as a whole is unreachable.
 */
export class CircuitOpenError extends MeliproxyError {
  readonly retryAfterSeconds: number
  constructor(retryAfterMs: number, route: string | null = null) {
    super(
      route === null ? ErrorCodes.UPSTREAM_CIRCUIT_OPEN : ErrorCodes.ROUTE_CIRCUIT_OPEN,
      route === null
        ? 'the upstream is unreachable: meliproxy stopped sending to it for a moment'
        : `the upstream is failing on ${route}: meliproxy stopped sending requests for that route for a moment`,
    )
    this.retryAfterSeconds = Math.max(1, Math.ceil(retryAfterMs / 1000))
  }
}

/** A request body over --max-body-size: 413 (the connection is closed after it: the rest of the body is unread). */
export class BodyTooLargeError extends MeliproxyError {
  constructor(max: number) {
    super(ErrorCodes.BODY_TOO_LARGE, `the request body is over ${max} bytes`)
  }
}

/**
 * A request body that did not arrive in time: a buffered one within --client-request-timeout, a streamed one at
 * --request-body-min-rate. 408, the connection closed after it, and an upstream request made for it aborted.
 */
export class SlowBodyError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.REQUEST_TIMEOUT, message)
  }
}

/**
 * The client closed its connection (or its upload) before its answer was complete: an upstream request made for it is
 * aborted with this, and nothing counts it against the upstream. Never sent to anyone (undici's RequestAbortedError).
 */
export class ClientAbortError extends Error {
  constructor() {
    super('the client closed its connection')
    this.name = 'ClientAbortError'
  }
}
