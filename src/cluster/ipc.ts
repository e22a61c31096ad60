import type { Worker } from 'node:cluster'
import type { ToPrimary, ToWorker } from '../messages.js'

/**
 * Sending on the primary-worker channel, in one place: a message to a process that has gone (a worker that died, a
 * worker whose primary went) is dropped, never an error.
 */

/** From a worker: a message to its primary; `then` runs once it is handed to the channel (or at once if gone). */
export function toPrimary(msg: ToPrimary, then?: () => void): void {
  if (!process.connected) return then?.()
  if (then === undefined) process.send!(msg)
  else process.send!(msg, undefined, {}, () => then())
}

/** From the primary: a message to one worker. */
export function toWorker(worker: Worker, msg: ToWorker): void {
  if (worker.isConnected()) worker.send(msg)
}

/** From the primary: a message to every worker but the one whose id is `except`. */
export function broadcast(workers: Iterable<Worker>, msg: ToWorker, except: number | null = null): void {
  for (const w of workers) if (w.id !== except) toWorker(w, msg)
}
