/**
 * Every error meliproxy raises on purpose, each with a stable code.
 * Clients see `{"error": "<code>", "message": "..."}`; the CLI prints one line and exits 2 on ConfigError.
 */

/** The registry of stable error codes: the wire value a client or an operator can match on. */
export const ErrorCodes = {
  CONFIG_INVALID: 'config_invalid',
  UPSTREAM_UNREACHABLE: 'upstream_unreachable',
  UPSTREAM_TIMEOUT: 'upstream_timeout',
  UPSTREAM_ERROR: 'upstream_error',
  BAD_REQUEST: 'bad_request',
  FORBIDDEN: 'forbidden',
  RATE_LIMITED: 'rate_limited',
  UPSTREAM_CIRCUIT_OPEN: 'upstream_circuit_open',
  ROUTE_CIRCUIT_OPEN: 'route_circuit_open',
  URI_TOO_LONG: 'uri_too_long',
  HEADERS_TOO_LARGE: 'headers_too_large',
  BODY_TOO_LARGE: 'body_too_large',
  REQUEST_TIMEOUT: 'request_timeout',
  METHOD_NOT_ALLOWED: 'method_not_allowed',
} as const

/** One of the stable codes above. */
export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes]

/** Base class: a code, an HTTP status for clients, and a message safe to show. */
export class MeliproxyError extends Error {
  readonly code: ErrorCode
  readonly status: number
  constructor(code: ErrorCode, status: number, message: string) {
    super(message)
    this.name = new.target.name
    this.code = code
    this.status = status
  }

  /** The JSON body a client receives for this error. */
  toJSON(): { error: ErrorCode; message: string } {
    return { error: this.code, message: this.message }
  }
}

/** A bad option from a flag, the environment or the config file; names the field and the value. */
export class ConfigError extends MeliproxyError {
  readonly field: string
  constructor(field: string, message: string) {
    super(ErrorCodes.CONFIG_INVALID, 500, `${field}: ${message}`)
    this.field = field
  }
}

/** The upstream could not be reached (refused, DNS, reset before a response): 502. */
export class UpstreamUnreachableError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.UPSTREAM_UNREACHABLE, 502, message)
  }
}

/** The upstream did not answer (or stalled mid-body) within the configured timeout: 504. */
export class UpstreamTimeoutError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.UPSTREAM_TIMEOUT, 504, message)
  }
}

/** Any other upstream failure before a response started: 502. */
export class UpstreamError extends MeliproxyError {
  constructor(message: string) {
    super(ErrorCodes.UPSTREAM_ERROR, 502, message)
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
      503,
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
    super(ErrorCodes.BODY_TOO_LARGE, 413, `the request body is over ${max} bytes`)
  }
}
