/** The proxy's plain data that leaves it: a breaker's state (reported over IPC). */

export type BreakerState = 'closed' | 'open' | 'half-open'
