import { fstatSync } from 'node:fs'

/** Log levels, least to most severe. */
export const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const
/** One of LOG_LEVELS. */
export type LogLevel = (typeof LOG_LEVELS)[number]

/**
 * JSON-lines logging: access lines on stdout, everything else on stderr. Built the way pino builds lines (pino
 * itself measured slower on cache hits with the access log on; figures in git log): a disabled level is a no-op
 * function (pino lib/levels.js) and a logger's bindings are serialised once, when it is made (lib/proto.js child()),
 * so a line costs only its own fields.
 * Access lines are batched and written every ACCESS_FLUSH_MS (or at ACCESS_FLUSH_BYTES), so a busy worker makes
 * a few write() calls a second instead of one per request. A worker that is SIGKILLed loses at most that window.
 */

const ACCESS_FLUSH_MS = 50
const ACCESS_FLUSH_BYTES = 64 * 1024

/** A destination with the shape of process.stdout. */
export interface Sink {
  write(chunk: string): unknown
}

/** A leveled JSON logger for operational events (stderr). */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void
  info(msg: string, fields?: Record<string, unknown>): void
  warn(msg: string, fields?: Record<string, unknown>): void
  error(msg: string, fields?: Record<string, unknown>): void
  /** A logger whose every line also carries `bindings` (serialised once, here). */
  child(bindings: Record<string, unknown>): Logger
}

const noop = (): void => {}

/** The syslog priority (RFC 5424) of each level: journald files a line by its `<N>` prefix. */
const PRIORITY: Record<LogLevel, number> = { debug: 7, info: 6, warn: 4, error: 3 }

/**
 * Whether file descriptor `fd` is a stream journald reads: systemd sets JOURNAL_STREAM to its `device:inode` for a
 * service whose output goes to the journal. There a line may start with its priority (`<3>`), which journald strips
 * and files, so `journalctl -p warning` finds warnings and errors; anywhere else lines stay plain JSON.
 */
export function journaldStream(fd: number, env: NodeJS.ProcessEnv = process.env): boolean {
  const stream = env.JOURNAL_STREAM
  if (stream === undefined || stream === '') return false
  try {
    const s = fstatSync(fd)
    return `${s.dev}:${s.ino}` === stream
  } catch {
    return false
  }
}

/** The `<N>` prefix of a level's lines where `syslog` is on, else ''. */
export function priorityPrefix(level: LogLevel, syslog: boolean): string {
  return syslog ? `<${PRIORITY[level]}>` : ''
}

/** URL user information (`redis://:secret@host`, `http://user:pass@host`), wherever it appears in a string. */
const USERINFO = /(\/\/)[^/@\s"]*@/g
/** Fields that can carry a URL or a message quoting one (a config error echoes the bad value): userinfo removed. */
const URL_FIELDS = new Set(['error', 'detail', 'upstream', 'url', 'redisUrl'])
/** Fields that are secrets as a whole. */
const SECRET_FIELDS = new Set(['authorization', 'cookie', 'password', 'token'])

/** JSON.stringify's replacer: strips URL credentials from URL_FIELDS and hides SECRET_FIELDS, at any depth. */
function redact(key: string, value: unknown): unknown {
  if (SECRET_FIELDS.has(key.toLowerCase())) return '[redacted]'
  if (typeof value === 'string' && URL_FIELDS.has(key)) return value.replace(USERINFO, '$1[redacted]@')
  return value
}

/** An object's members as JSON text after a comma (`,"a":1,"b":2`), or '' for none: a line's bindings or fields. */
function members(fields: Record<string, unknown>): string {
  const json = JSON.stringify(fields, redact)
  return json.length > 2 ? ',' + json.slice(1, -1) : ''
}

/**
 * A Logger at level index `min` whose lines carry `bound`, serialised once as `bindings`. A field named like a
 * binding replaces it (one member per name, as the object spread did), at the cost of serialising both on that line.
 */
function logger(min: number, sink: Sink, bound: Record<string, unknown>, bindings: string, syslog: boolean): Logger {
  const rest = (fields: Record<string, unknown> | undefined): string => {
    if (fields === undefined) return bindings
    for (const k in fields) if (k in bound) return members({ ...bound, ...fields })
    return bindings + members(fields)
  }
  const level = (name: LogLevel): Logger[LogLevel] => {
    if (LOG_LEVELS.indexOf(name) < min) return noop
    const start = `${priorityPrefix(name, syslog)}{"time":"`
    const head = `","level":"${name}","msg":`
    return (msg, fields) =>
      sink.write(`${start}${new Date().toISOString()}${head}${JSON.stringify(msg)}${rest(fields)}}\n`)
  }
  return {
    debug: level('debug'),
    info: level('info'),
    warn: level('warn'),
    error: level('error'),
    child: (more) => {
      const all = { ...bound, ...more }
      return logger(min, sink, all, members(all), syslog)
    },
  }
}

/**
 * Creates a Logger writing one JSON object per line to `sink`, dropping lines below `level`: `time`, `level`, `msg`,
 * the `base` bindings, then the fields (a field named like a binding replaces it). Credentials in the fields are
 * redacted (see URL_FIELDS, SECRET_FIELDS). With `syslog` (see journaldStream), each line starts with its priority.
 */
export function createLogger(level: LogLevel, sink: Sink, base: Record<string, unknown>, syslog = false): Logger {
  return logger(LOG_LEVELS.indexOf(level), sink, base, members(base), syslog)
}

/** Characters that need escaping inside a JSON string. */
const NEEDS_ESCAPE = /["\\\u0000-\u001f\u007f-\uffff]/

/** A JSON string literal; plain ASCII (nearly every IP, method and path) skips JSON.stringify. */
function quote(s: string): string {
  return NEEDS_ESCAPE.test(s) ? JSON.stringify(s) : '"' + s + '"'
}

/** Milliseconds to 3 decimals (Number.prototype.toFixed is slower on the per-request path). */
function ms(v: number): number {
  return Math.round(v * 1000) / 1000
}

/** One request as the access log records it. */
export interface AccessEntry {
  time: number
  ip: string
  method: string
  path: string
  status: number
  bytes: number
  durationMs: number
  upstreamMs: number | null
  cache?: string
  limited?: string
  /** A shadow rule that would have rejected the request. */
  shadowLimited?: string
  /** Why the proxy refused the request itself (a parser or guard error code). */
  reason?: string
}

/** Batches access-log lines and flushes them every ACCESS_FLUSH_MS or ACCESS_FLUSH_BYTES. */
export class AccessLog {
  readonly #sink: Sink
  /** The line's last member, serialised once: `"worker":N}` and the newline. */
  readonly #tail: string
  #buffer = ''
  #scheduled = false
  #lastTime = -1
  #lastIso = ''

  constructor(sink: Sink, worker: number) {
    this.#sink = sink
    this.#tail = `"worker":${worker}}\n`
  }

  /** Queues one line. */
  write(e: AccessEntry): void {
    if (e.time !== this.#lastTime) {
      // Many requests share a millisecond under load: format the timestamp once per millisecond.
      this.#lastTime = e.time
      this.#lastIso = new Date(e.time).toISOString()
    }
    this.#buffer +=
      `{"time":"${this.#lastIso}","ip":${quote(e.ip)},"method":${quote(e.method)},` +
      `"path":${quote(e.path)},"status":${e.status},"bytes":${e.bytes},"durationMs":${ms(e.durationMs)},` +
      `"upstreamMs":${e.upstreamMs === null ? 'null' : ms(e.upstreamMs)},` +
      (e.cache ? `"cache":"${e.cache}",` : '') +
      (e.limited ? `"limited":${JSON.stringify(e.limited)},` : '') +
      (e.shadowLimited ? `"shadowLimited":${JSON.stringify(e.shadowLimited)},` : '') +
      (e.reason ? `"reason":${quote(e.reason)},` : '') +
      this.#tail
    if (this.#buffer.length >= ACCESS_FLUSH_BYTES) this.flush()
    else if (!this.#scheduled) {
      this.#scheduled = true
      setTimeout(this.flush, ACCESS_FLUSH_MS)
    }
  }

  /** Writes what is queued (bound, so it can be passed as a callback). */
  readonly flush = (): void => {
    this.#scheduled = false
    if (this.#buffer === '') return
    const out = this.#buffer
    this.#buffer = ''
    this.#sink.write(out)
  }
}
