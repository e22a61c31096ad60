import type { LeaseAcquireMessage, LeaseGrantMessage, LeaseReleaseMessage } from '../messages.js'
import type { Giveback, LeaseGrant, LeasePool, LeaseRequest } from './pool.js'

/**
 * How long a worker waits for the primary's answer before the lease request fails: the worker then decides on its
 * offline shares (src/limiter/leases.ts) until the primary answers again.
 */
const REPLY_TIMEOUT_MS = 500

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
      this.#send({ meliproxy: 'lease-acquire', id, req })
    })
  }

  release(giveback: Giveback): void {
    this.#send({ meliproxy: 'lease-release', giveback })
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
