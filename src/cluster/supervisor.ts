import cluster, { type Worker } from 'node:cluster'
import { encodeConfig, WORKER_CONFIG_ENV, type Config } from '../config.js'
import type { Logger } from '../log.js'
import type { DrainMessage } from '../messages.js'
import { toWorker } from './ipc.js'

/**
 * The worker supervisor of the primary: forks the workers (they share the proxy socket), replaces any that die (with
 * exponential backoff when they crash at start, so a broken build does not fork-bomb), replaces them one at a time on
 * a reload (each new one listening before an old one drains), and drains them all on shutdown.
 */

/** A worker that lived less than this counts as a crash at start. */
const SHORT_LIFE_MS = 5_000
const MAX_BACKOFF_MS = 30_000
/** How long a new worker may take to listen during a reload before the reload is abandoned. */
const LISTEN_TIMEOUT_MS = 10_000

/** One worker as the primary sees it. */
export interface WorkerState {
  readonly worker: Worker
  readonly startedAt: number
  listening: boolean
  /** Set when we asked it to drain: its exit is expected and not replaced. */
  retiring: boolean
  /** The rule-set version it enforces. */
  rulesVersion: number
}

/** What the supervisor asks of the primary. */
export interface SupervisorHooks {
  /** The config a worker forked now gets. */
  config(): Config
  /** The rule-set version a worker forked now enforces. */
  rulesVersion(): number
  /** A worker started listening. */
  listening(state: WorkerState): void
  /** A worker is gone (for whatever reason). */
  exited(workerId: number): void
  /** A worker died unexpectedly and will be replaced. */
  restarted(): void
  /** After stop(): every worker has exited. */
  stopped(): void
}

export class Supervisor {
  readonly #workers = new Map<number, WorkerState>()
  readonly #hooks: SupervisorHooks
  readonly #log: Logger
  #crashes = 0
  #restarts = 0
  #respawnTimer: NodeJS.Timeout | null = null
  #stopping = false

  constructor(hooks: SupervisorHooks, log: Logger) {
    this.#hooks = hooks
    this.#log = log
    cluster.on('exit', this.#exit)
  }

  /** Forks `n` workers. */
  start(n: number): void {
    for (let i = 0; i < n; i++) this.#fork(this.#hooks.config())
  }

  /** Workers listening and not retiring. */
  get listening(): number {
    let n = 0
    for (const w of this.#workers.values()) if (w.listening && !w.retiring) n++
    return n
  }

  /** Workers replaced after dying unexpectedly, since start. */
  get restarts(): number {
    return this.#restarts
  }

  /** True once stop() was called. */
  get stopping(): boolean {
    return this.#stopping
  }

  /** The workers that are not retiring. */
  active(): WorkerState[] {
    return [...this.#workers.values()].filter((w) => !w.retiring)
  }

  /** Every worker, retiring ones too (for messages to all). */
  all(): IterableIterator<WorkerState> {
    return this.#workers.values()
  }

  /** Replaces the workers one at a time with ones forked with `next`; rejects when a new one never listens. */
  async replaceAll(next: Config): Promise<void> {
    const old = this.active()
    for (let i = 0; i < old.length; i++) {
      if (i < next.workers) await this.#replace(old[i]!, next)
      else this.#drain(old[i]!)
    }
    for (let i = old.length; i < next.workers; i++) this.#fork(next)
  }

  /**
   * Drains every worker after `delayMs` (the workers keep serving meanwhile while a load balancer notices the
   * failing /readyz), killing those that ignore it after `drainTimeoutMs` plus a margin; `stopped` once all exited.
   */
  stop(delayMs: number, drainTimeoutMs: number): void {
    this.#stopping = true
    if (this.#respawnTimer !== null) clearTimeout(this.#respawnTimer)
    const drainAll = (): void => {
      for (const w of this.#workers.values()) this.#drain(w)
      setTimeout(() => this.kill(), drainTimeoutMs + 2_000).unref()
      if (this.#workers.size === 0) this.#hooks.stopped()
    }
    if (delayMs > 0) setTimeout(drainAll, delayMs)
    else drainAll()
  }

  /** SIGKILLs every worker (a second signal). */
  kill(): void {
    for (const w of this.#workers.values()) w.worker.process.kill('SIGKILL')
  }

  #fork(cfg: Config): WorkerState {
    // cluster.fork() runs process.execPath with process.argv[1]: from the source tree node with bin/meliproxy; in the
    // single executable the executable itself, whose embedded entry point ignores that argument and starts a worker.
    const worker = cluster.fork({ [WORKER_CONFIG_ENV]: encodeConfig(cfg) })
    const state: WorkerState = { worker, startedAt: Date.now(), listening: false, retiring: false, rulesVersion: this.#hooks.rulesVersion() }
    this.#workers.set(worker.id, state)
    worker.on('listening', () => {
      state.listening = true
      this.#log.debug('worker listening', { worker: worker.id, pid: worker.process.pid })
      this.#hooks.listening(state)
    })
    return state
  }

  readonly #exit = (worker: Worker, code: number, signal: string): void => {
    const state = this.#workers.get(worker.id)
    this.#workers.delete(worker.id)
    this.#hooks.exited(worker.id)
    if (!state || state.retiring || this.#stopping) {
      if (this.#stopping && this.#workers.size === 0) this.#hooks.stopped()
      return
    }
    const lived = Date.now() - state.startedAt
    this.#crashes = lived < SHORT_LIFE_MS ? this.#crashes + 1 : 0
    this.#restarts++
    this.#hooks.restarted()
    this.#log.error('worker died, replacing it', { worker: worker.id, pid: worker.process.pid, code, signal, livedMs: lived })
    this.#scheduleRespawn()
  }

  #scheduleRespawn(): void {
    if (this.#stopping || this.#respawnTimer !== null) return
    const missing = this.#hooks.config().workers - this.active().length
    if (missing <= 0) return
    const crashes = this.#crashes
    const delay = crashes === 0 ? 0 : Math.min(100 * 2 ** (crashes - 1), MAX_BACKOFF_MS)
    if (crashes > 0) this.#log.warn('worker crash loop: backing off before respawn', { crashes, delayMs: delay })
    this.#respawnTimer = setTimeout(() => {
      this.#respawnTimer = null
      if (this.#stopping) return
      for (let i = 0; i < missing; i++) this.#fork(this.#hooks.config())
    }, delay)
  }

  /** Forks a replacement with `cfg`, waits until it listens, then drains `old`. Rejects if it never listens. */
  #replace(old: WorkerState, cfg: Config): Promise<void> {
    return new Promise((resolve, reject) => {
      const fresh = this.#fork(cfg)
      const timer = setTimeout(() => {
        fresh.retiring = true
        fresh.worker.process.kill('SIGKILL')
        reject(new Error(`new worker did not listen within ${LISTEN_TIMEOUT_MS} ms`))
      }, LISTEN_TIMEOUT_MS)
      fresh.worker.once('listening', () => {
        clearTimeout(timer)
        this.#drain(old)
        resolve()
      })
      fresh.worker.once('exit', () => {
        clearTimeout(timer)
        reject(new Error('new worker exited before listening'))
      })
    })
  }

  #drain(state: WorkerState): void {
    state.retiring = true
    const msg: DrainMessage = { meliproxy: 'drain' }
    toWorker(state.worker, msg)
  }
}
