import type { MeliproxyError } from '../errors.js'
import type { Exchange } from '../exchange.js'
import { answered, sendError, type ForwardResult } from '../proxy/forward.js'

/**
 * The request path as an ordered list of named stages (src/worker.ts lists them). A stage looks at the exchange and
 * either answers it (`p.reject`, or a response of its own followed by `p.finish`) or hands it on (`p.next`). Stages
 * are plain functions made once at start: a stage that decides synchronously (a guard, a lease in hand, an L1 hit)
 * costs no promise and no closure per request.
 *
 * The pipeline owns finishing: every exchange is recorded (in-flight count, metrics, statistics, access log) by
 * `finish`, exactly once; a second call is a bug, logged and ignored rather than counted twice.
 */

/** One stage of the request path. */
export type Stage = (x: Exchange, p: Pipeline) => void

/** Records a finished exchange (metrics, statistics, access log). */
export type Recorder = (x: Exchange, result: ForwardResult) => void

export class Pipeline {
  /** The stage names, in order (for logs, tests and readers). */
  readonly names: readonly string[]
  readonly #stages: readonly Stage[]
  readonly #record: Recorder
  readonly #onRefused: (x: Exchange, err: MeliproxyError) => void
  readonly #onBug: (msg: string, x: Exchange) => void

  constructor(
    stages: readonly (readonly [name: string, stage: Stage])[],
    hooks: { record: Recorder; refused: (x: Exchange, err: MeliproxyError) => void; bug: (msg: string, x: Exchange) => void },
  ) {
    this.names = stages.map(([name]) => name)
    this.#stages = stages.map(([, stage]) => stage)
    this.#record = hooks.record
    this.#onRefused = hooks.refused
    this.#onBug = hooks.bug
  }

  /** Starts an exchange at the first stage. */
  run(x: Exchange): void {
    x.stage = 0
    this.next(x)
  }

  /** Hands the exchange to its next stage. */
  next(x: Exchange): void {
    const stage = this.#stages[x.stage++]
    if (stage === undefined) {
      this.#onBug('the last stage handed an exchange on', x)
      return this.finish(x, answered(0, 0))
    }
    stage(x, this)
  }

  /** Answers with an error the proxy decided on (no upstream call), and finishes. */
  reject(x: Exchange, err: MeliproxyError): void {
    x.reason = err.code
    this.#onRefused(x, err)
    const bytes = sendError(x.res, err)
    this.finish(x, answered(err.status, bytes))
  }

  /** Records the exchange, once. */
  finish(x: Exchange, result: ForwardResult): void {
    if (x.finished) return this.#onBug('an exchange was finished twice', x)
    x.finished = true
    this.#record(x, result)
  }
}
