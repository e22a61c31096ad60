import type { LimitResultMessage, LimitTakeMessage } from '../messages.js'
import type { CounterStore, TakeItem, TakeResult } from './counter.js'

/**
 * A worker's view of the counter held in the primary: exact across the workers of one instance, because the
 * primary takes for one request at a time. Used without Redis, and as the fallback while Redis is unusable.
 */
export class PrimaryCounter implements CounterStore {
  readonly #pending = new Map<number, (r: TakeResult) => void>()
  readonly #send: (msg: LimitTakeMessage) => void
  #next = 1

  constructor(send: (msg: LimitTakeMessage) => void) {
    this.#send = send
  }

  take(items: readonly TakeItem[]): Promise<TakeResult> {
    const id = this.#next++
    return new Promise((resolve) => {
      this.#pending.set(id, resolve)
      this.#send({ meliproxy: 'limit-take', id, items })
    })
  }

  /** Delivers the primary's answer to the take with the same id. */
  deliver(msg: LimitResultMessage): void {
    const resolve = this.#pending.get(msg.id)
    if (resolve === undefined) return
    this.#pending.delete(msg.id)
    resolve(msg.result)
  }
}
