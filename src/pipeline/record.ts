import { CircuitOpenError } from '../errors.js'
import type { Exchange } from '../exchange.js'
import type { AccessLog, Logger } from '../log.js'
import type { WorkerMetrics } from '../metrics.js'
import type { StatsRecorder } from '../stats/recorder.js'
import type { Recorder } from './pipeline.js'

/** What a finished exchange is written to. */
export interface RecordSinks {
  readonly metrics: WorkerMetrics
  readonly stats: StatsRecorder | null
  readonly accessLog: AccessLog | null
  readonly log: Logger
}

/**
 * What happens to every exchange once its response closed (the pipeline runs it exactly once, from the response's
 * 'close'): request metrics, statistics, upstream error counts and logs, the access log line. It reads what the
 * exchange says was sent (src/exchange.ts ExchangeResult).
 */
export function recorder({ metrics, stats, accessLog, log }: RecordSinks): Recorder {
  return (x: Exchange): void => {
    const durationMs = performance.now() - x.started
    metrics.observe(x.method, x.status, metrics.route(x.url), durationMs / 1000)
    stats?.record(x, x.status, durationMs)
    if (x.upstreamMs !== null) metrics.upstreamDuration.observe(x.upstreamMs / 1000)
    // A 4xx error here is the client's (a body over the limit), not the upstream's.
    const error = x.error
    if (error !== null && error.status >= 500) {
      metrics.upstreamErrors.labels(error.code).inc()
      // An open breaker is logged once when it opens, not per refused request.
      if (!(error instanceof CircuitOpenError)) {
        log.warn('upstream error', { code: error.code, detail: error.message, path: x.path })
      }
    }
    accessLog?.write({
      time: x.time,
      ip: x.ip,
      method: x.method,
      path: x.url,
      status: x.status,
      bytes: x.bytes,
      durationMs,
      upstreamMs: x.upstreamMs,
      limited: x.limitedBy,
      shadowLimited: x.shadowLimitedBy,
      cache: x.cache,
      reason: x.reason,
    })
  }
}
