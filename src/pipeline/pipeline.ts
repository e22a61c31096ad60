import type { MeliproxyError } from '../errors.js'
import type { Exchange } from '../exchange.js'
import { onResponseEnd, sendError, track, type EndListener } from '../proxy/reply.js'

/**
 * The request path as an ordered list of named stages (src/worker.ts lists them: guard -> limit -> body -> cache
 * -> upstream). A stage looks at the exchange and either answers it (`p.reject`, or an answer of its own through
 * src/proxy/reply.ts) or hands it on (`p.next`); no stage calls back up. Stages are plain functions made once at
 * start: a stage that decides synchronously (a guard, a lease in hand, an L1 hit) costs no promise and no closure per
 * request.
 *
 * Recording (in-flight count, metrics, statistics, access log) hangs once off each exchange's response: `record` runs
 * when it closes, whoever answered and however (src/proxy/reply.ts `onResponseEnd`).
 */

/** One stage of the request path. */
export type Stage = (x: Exchange, p: Pipeline) => void

/** Records a finished exchange (metrics, statistics, access log). */
export type Recorder = (x: Exchange) => void

export class Pipeline {
  /** The stage names, in order (for logs, tests and readers). */
  readonly names: readonly string[]
  readonly #stages: readonly Stage[]
  readonly #ended: EndListener
  readonly #onRefused: (x: Exchange, err: MeliproxyError) => void
  readonly #onBug: (msg: string, x: Exchange) => void

  /** `stages` in order; a null stage (a part turned off, e.g. the cache) is left out. */
  constructor(
    stages: readonly (readonly [name: string, stage: Stage | null])[],
    hooks: { record: Recorder; refused: (x: Exchange, err: MeliproxyError) => void; bug: (msg: string, x: Exchange) => void },
  ) {
    const present = stages.filter((s): s is readonly [string, Stage] => s[1] !== null)
    this.names = present.map(([name]) => name)
    this.#stages = present.map(([, stage]) => stage)
    this.#ended = onResponseEnd(hooks.record)
    this.#onRefused = hooks.refused
    this.#onBug = hooks.bug
  }

  /** Starts an exchange at the first stage; it is recorded once its response closes. */
  run(x: Exchange): void {
    track(x, this.#ended)
    x.stage = 0
    this.next(x)
  }

  /** Hands the exchange to its next stage. */
  next(x: Exchange): void {
    const stage = this.#stages[x.stage++]
    if (stage === undefined) {
      this.#onBug('the last stage handed an exchange on', x)
      x.res.destroy()
      return
    }
    stage(x, this)
  }

  /** Answers with an error the proxy decided on (no upstream call). */
  reject(x: Exchange, err: MeliproxyError): void {
    x.reason = err.code
    this.#onRefused(x, err)
    sendError(x, err)
  }
}
