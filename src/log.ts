import { LOG_LEVELS, type LogLevel } from './config.js'

/**
 * JSON-lines logging: access lines on stdout, everything else on stderr.
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
}

/** Creates a Logger writing one JSON object per line to `sink`, dropping lines below `level`. */
export function createLogger(level: LogLevel, sink: Sink, base: Record<string, unknown>): Logger {
  const min = LOG_LEVELS.indexOf(level)
  const make =
    (lvl: LogLevel) =>
    (msg: string, fields?: Record<string, unknown>): void => {
      if (LOG_LEVELS.indexOf(lvl) < min) return
      sink.write(JSON.stringify({ time: new Date().toISOString(), level: lvl, msg, ...base, ...fields }) + '\n')
    }
  return { debug: make('debug'), info: make('info'), warn: make('warn'), error: make('error') }
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
  readonly #worker: number
  #buffer = ''
  #scheduled = false
  #lastTime = -1
  #lastIso = ''

  constructor(sink: Sink, worker: number) {
    this.#sink = sink
    this.#worker = worker
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
      `"worker":${this.#worker}}\n`
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
