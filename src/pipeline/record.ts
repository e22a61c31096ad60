import { CircuitOpenError } from '../errors.js'
import type { Exchange } from '../exchange.js'
import type { AccessLog, Logger } from '../log.js'
import type { WorkerMetrics } from '../metrics.js'
import type { ForwardResult } from '../proxy/forward.js'
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
 * What the pipeline does with every exchange once it is answered (it calls this exactly once per exchange):
 * request metrics, statistics, upstream error counts and logs, the access log line.
 */
export function recorder({ metrics, stats, accessLog, log }: RecordSinks): Recorder {
  return (x: Exchange, result: ForwardResult): void => {
    const durationMs = performance.now() - x.started
    metrics.observe(x.method, result.status, metrics.route(x.url), durationMs / 1000)
    stats?.record(x, result.status, durationMs)
    if (result.upstreamMs !== null) metrics.upstreamDuration.observe(result.upstreamMs / 1000)
    // A 4xx error here is the client's (a body over the limit), not the upstream's.
    if (result.error !== null && result.error.status >= 500) {
      metrics.upstreamErrors.labels(result.error.code).inc()
      // An open breaker is logged once when it opens, not per refused request.
      if (!(result.error instanceof CircuitOpenError)) {
        log.warn('upstream error', { code: result.error.code, detail: result.error.message, path: x.path })
      }
    }
    accessLog?.write({
      time: x.time,
      ip: x.ip,
      method: x.method,
      path: x.url,
      status: result.status,
      bytes: result.bytes,
      durationMs,
      upstreamMs: result.upstreamMs,
      limited: x.limitedBy,
      shadowLimited: x.shadowLimitedBy,
      cache: x.cache,
      reason: x.reason,
    })
  }
}
