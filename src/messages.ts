import type { Purge } from './cache/http-cache.js'
import type { LeaseGrant, LeaseRequest } from './limiter/pool.js'
import type { RuleSpec } from './limiter/rules.js'
import type { Cidr } from './net/ip.js'
import type { BreakerState } from './proxy/breaker.js'
import type { StatsBatch } from './stats/batch.js'

/**
 * Every message between the primary and its workers, as one typed union.
 * (prom-client's AggregatorRegistry sends its own messages on the same channel; `isMeliproxyMessage` tells ours apart.)
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
}

/** Primary -> worker: the answer to a LeaseAcquireMessage with the same id. */
export interface LeaseGrantMessage {
  readonly meliproxy: 'lease-grant'
  readonly id: number
  readonly grant: LeaseGrant
}

/** Worker -> primary: unused tokens of a window go back to the primary's pool. */
export interface LeaseReleaseMessage {
  readonly meliproxy: 'lease-release'
  readonly key: string
  readonly windowStart: number
  readonly tokens: number
}

/** Primary -> worker: a rule's counters (or one bucket's, when `bucket` is set) were reset: drop their leases. */
export interface LimitsResetMessage {
  readonly meliproxy: 'limits-reset'
  readonly rule: string
  readonly bucket: string | null
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
}

/** Worker -> primary: one of its circuit breakers changed state (`route` null: the upstream-wide one). */
export interface BreakerMessage {
  readonly meliproxy: 'breaker'
  readonly route: string | null
  readonly state: BreakerState
}

/** Any message of ours. (A worker's readiness needs none: cluster reports 'listening' itself.) */
export type MeliproxyMessage =
  | DrainMessage
  | LeaseAcquireMessage
  | LeaseGrantMessage
  | LeaseReleaseMessage
  | LimitsResetMessage
  | CachePurgeMessage
  | StatsMessage
  | SetRulesMessage
  | BreakerMessage

/** True for a message sent by meliproxy itself (not by a library sharing the IPC channel). */
export function isMeliproxyMessage(msg: unknown): msg is MeliproxyMessage {
  return typeof msg === 'object' && msg !== null && typeof (msg as { meliproxy?: unknown }).meliproxy === 'string'
}
