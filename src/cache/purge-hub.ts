import { randomUUID } from 'node:crypto'
import type { RedisClient } from '../redis/cluster.js'
import { ErrorCodes, MeliproxyError } from '../errors.js'
import type { Logger } from '../log.js'
import { PURGE_CHANNEL } from '../redis/keys.js'
import type { Purge } from './types.js'
import { dropSharedMatching, pathGlobMatcher } from './tiers.js'

/**
 * Cache purges have one owner, the primary: each worker of this instance drops the keys once (not the worker that
 * sent them, which already did), and other instances hear of it on the channel, tagged with this instance's id so
 * that this instance ignores its own message. (An older instance reads the same message: keys or glob, and `from`.)
 */
export class PurgeHub {
  readonly #id = randomUUID()
  readonly #redis: RedisClient | null
  readonly #deliver: (purge: Purge, exceptWorker: number | null) => void
  readonly #log: Logger

  /**
   * `deliver` hands a purge to this instance's workers but one; `subscriber` is the primary's connection for
   * channels (it may be shared with others: messages of other channels are ignored).
   */
  constructor(redis: RedisClient | null, subscriber: RedisClient | null, deliver: (purge: Purge, exceptWorker: number | null) => void, log: Logger) {
    this.#redis = redis
    this.#deliver = deliver
    this.#log = log
    subscriber?.subscribe(PURGE_CHANNEL).catch(() => {})
    // A purge announced while the connection was away (a Redis node gone, the connection moving to the next) is not
    // delivered later: once subscribed again, this instance's L1 is emptied (L2, shared, was purged by the sender).
    let connected = subscriber?.status === 'ready'
    subscriber?.on('ready', () => {
      if (!connected) return void (connected = true)
      subscriber.subscribe(PURGE_CHANNEL).then(() => {
        log.info('purge channel subscribed again; L1 emptied, a purge may have been missed meanwhile')
        this.#deliver({ glob: '/**' }, null)
      }, () => {})
    })
    subscriber?.on('message', (channel: string, text: string) => {
      if (channel !== PURGE_CHANNEL) return
      try {
        const m = JSON.parse(text) as Purge & { from?: string }
        if (m.from !== this.#id) this.#deliver({ keys: m.keys, glob: m.glob }, null)
      } catch {
        log.warn('ignored a malformed cache purge message')
      }
    })
  }

  /** A purge that started here: worker `sender` (already done there), or null for the admin API. */
  publish(purge: Purge, sender: number | null): void {
    this.#deliver(purge, sender)
    this.#redis?.publish(PURGE_CHANNEL, JSON.stringify({ ...purge, from: this.#id })).catch(() => {})
  }

  /** Purges a path glob: L1 of every worker of every instance, then L2; returns the L2 entries removed. */
  async purgeGlob(origin: string, glob: string): Promise<{ removed: number } | { invalid: string }> {
    const match = pathGlobMatcher(origin, glob)
    if (typeof match === 'string') return { invalid: match }
    this.publish({ glob }, null)
    if (this.#redis === null || this.#redis.status !== 'ready') return { removed: 0 }
    let removed: number
    try {
      removed = await dropSharedMatching(this.#redis, match)
    } catch (err) {
      // Every L1 has dropped them; some L2 entries may be left (a master down or failing over): the caller retries.
      const message = (err as Error).message
      this.#log.warn('cache purge did not reach every Redis master', { glob, error: message })
      throw new MeliproxyError(ErrorCodes.REDIS_UNAVAILABLE, `the purge may have left entries in Redis (retry): ${message}`)
    }
    this.#log.info('cache purged', { glob, removedFromL2: removed })
    return { removed }
  }
}
