import type { LeaseAcquireMessage, LeaseGrantMessage, LeaseReleaseMessage } from '../messages.js'
import type { LeasePool } from './pool.js'
import type { Giveback, LeaseGrant, LeaseRequest } from './types.js'

/**
 * How long a worker waits for the primary's answer before the lease request fails: the worker then decides on its
 * offline shares (src/limiter/leases.ts) until the primary answers again.
 */
const REPLY_TIMEOUT_MS = 500
/** The primary does not answer a request older than this: the worker has given up on it (or is about to). */
export const STALE_REQUEST_MS = 400

interface Pending {
  readonly resolve: (g: LeaseGrant) => void
  readonly reject: (err: Error) => void
  readonly timer: NodeJS.Timeout
}

/**
 * A worker's view of the pool held in the primary (a MemoryPool): exact across the workers of one instance.
 * Used without Redis, and as the fallback while Redis is unusable. One IPC round trip per lease, not per request.
 */
export class PrimaryPool implements LeasePool {
  readonly #pending = new Map<number, Pending>()
  #givebacks: Giveback[] = []
  readonly #send: (msg: LeaseAcquireMessage | LeaseReleaseMessage) => void
  #next = 1

  constructor(send: (msg: LeaseAcquireMessage | LeaseReleaseMessage) => void) {
    this.#send = send
  }

  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    const id = this.#next++
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id)
        reject(new Error(`the primary did not answer a lease request within ${REPLY_TIMEOUT_MS} ms`))
      }, REPLY_TIMEOUT_MS)
      timer.unref()
      this.#pending.set(id, { resolve, reject, timer })
      this.#send({ meliproxy: 'lease-acquire', id, req, sent: Date.now() })
    })
  }

  /** Gives tokens back; every give-back of one turn of the event loop goes in one message. */
  release(giveback: Giveback): void {
    this.#givebacks.push(giveback)
    if (this.#givebacks.length === 1) setImmediate(() => this.#flush())
  }

  #flush(): void {
    const givebacks = this.#givebacks
    this.#givebacks = []
    if (givebacks.length > 0) this.#send({ meliproxy: 'lease-release', givebacks })
  }

  /** Delivers the primary's answer to the request with the same id. */
  deliver(msg: LeaseGrantMessage): void {
    const p = this.#pending.get(msg.id)
    if (p === undefined) return
    this.#pending.delete(msg.id)
    clearTimeout(p.timer)
    p.resolve(msg.grant)
  }
}
