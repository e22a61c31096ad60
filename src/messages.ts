import type { Purge } from './cache/types.js'
import type { Generations, Giveback, LeaseGrant, LeaseRequest, RuleSpec } from './limiter/types.js'
import type { Cidr } from './net/ip.js'
import type { BreakerState } from './proxy/types.js'
import type { StatsBatch } from './stats/types.js'

/**
 * Every message between the primary and its workers, split by direction (ToPrimary, ToWorker); each side
 * dispatches through a handler map that must cover every message of its direction.
 */

/** Primary -> worker: stop accepting, finish in-flight requests within the drain timeout, exit 0. */
export interface DrainMessage {
  readonly meliproxy: 'drain'
}

/** Worker -> primary: lease tokens of a bucket from the primary's pool (embedded mode, or Redis fallback). */
export interface LeaseAcquireMessage {
  readonly meliproxy: 'lease-acquire'
  readonly id: number
  readonly req: LeaseRequest
  /** When the worker sent it (ms, this machine's clock): one the worker has given up on is not answered. */
  readonly sent: number
}

/** Primary -> worker: the answer to a LeaseAcquireMessage with the same id. */
export interface LeaseGrantMessage {
  readonly meliproxy: 'lease-grant'
  readonly id: number
  readonly grant: LeaseGrant
}

/** Worker -> primary: unused tokens go back to the primary's pool, in one message per turn of the worker's loop. */
export interface LeaseReleaseMessage {
  readonly meliproxy: 'lease-release'
  readonly givebacks: readonly Giveback[]
}

/**
 * Primary -> worker: a rule's counters were reset: count it under `generation` from now on and drop the leases of the
 * old one. With `bucket` set, only that bucket's counters were: drop its leases.
 */
export interface LimitsResetMessage {
  readonly meliproxy: 'limits-reset'
  readonly rule: string
  readonly bucket: string | null
  readonly generation: number
}

/** Worker -> primary -> every worker: drop keys or a path glob from L1 (L2 is handled by the sender). */
export interface CachePurgeMessage {
  readonly meliproxy: 'cache-purge'
  readonly purge: Purge
}

/** Worker -> primary, about once a second: the statistics counted since the last one. */
export interface StatsMessage {
  readonly meliproxy: 'stats'
  readonly batches: readonly StatsBatch[]
}

/** Primary -> worker: enforce this rule set from now on (admin API, or another instance's change). */
export interface SetRulesMessage {
  readonly meliproxy: 'set-rules'
  readonly version: number
  readonly limits: readonly RuleSpec[]
  readonly allow: readonly Cidr[]
  readonly deny: readonly Cidr[]
  /** Each rule's generation (how often its counters were reset): part of its bucket keys. */
  readonly generations: Generations
}

/** Worker -> primary: one of its circuit breakers changed state (`route` null: the upstream-wide one). */
export interface BreakerMessage {
  readonly meliproxy: 'breaker'
  readonly route: string | null
  readonly state: BreakerState
}

/** Every message a worker sends the primary. */
export type ToPrimary = LeaseAcquireMessage | LeaseReleaseMessage | CachePurgeMessage | StatsMessage | BreakerMessage

/** Every message the primary sends a worker. */
export type ToWorker = DrainMessage | LeaseGrantMessage | LimitsResetMessage | CachePurgeMessage | SetRulesMessage

/**
 * A handler for every message of a direction: a message type without a handler does not compile. `A` are extra
 * arguments the receiver passes along (the primary: the worker that sent it).
 */
export type Handlers<M extends { readonly meliproxy: string }, A extends unknown[] = []> = {
  readonly [K in M['meliproxy']]: (msg: Extract<M, { readonly meliproxy: K }>, ...args: A) => void
}

/**
 * Hands a message received over IPC to its handler. Messages that are not ours (prom-client's AggregatorRegistry
 * uses the same channel) or of an unknown type are ignored.
 */
export function dispatch<M extends { readonly meliproxy: string }, A extends unknown[]>(
  handlers: Handlers<M, A>,
  msg: unknown,
  ...args: A
): void {
  if (typeof msg !== 'object' || msg === null) return
  const type = (msg as { meliproxy?: unknown }).meliproxy
  if (typeof type !== 'string' || !Object.hasOwn(handlers, type)) return
  ;(handlers[type as M['meliproxy']] as (m: M, ...a: A) => void)(msg as M, ...args)
}
