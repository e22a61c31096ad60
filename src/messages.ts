/**
 * Every message between the primary and its workers, as one typed union.
 * (prom-client's AggregatorRegistry and rate-limiter-flexible's cluster limiter send their own messages on the
 * same channel; `isMeliproxyMessage` tells ours apart.)
 */

/** Primary -> worker: stop accepting, finish in-flight requests within the drain timeout, exit 0. */
export interface DrainMessage {
  readonly meliproxy: 'drain'
}

/** Any message of ours. (A worker's readiness needs none: cluster reports 'listening' itself.) */
export type MeliproxyMessage = DrainMessage

/** True for a message sent by meliproxy itself (not by a library sharing the IPC channel). */
export function isMeliproxyMessage(msg: unknown): msg is MeliproxyMessage {
  return typeof msg === 'object' && msg !== null && typeof (msg as { meliproxy?: unknown }).meliproxy === 'string'
}
