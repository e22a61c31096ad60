/** The limiter's plain data: rule specs as they travel to workers and into Redis, and the lease contract. */

/** How a bucket counts (a rule's `algorithm`). */
export type Algorithm = 'fixed' | 'sliding' | 'token-bucket'

/** One lease request: a bucket, its rule's limit and window, how many tokens the holder would like and needs. */
export interface LeaseRequest {
  readonly key: string
  readonly limit: number
  readonly windowMs: number
  readonly want: number
  /** The fewest tokens worth granting (the cost of the request that asked): `need` or more, or nothing. */
  readonly need: number
  /** How many holders share the pool (instances x workers): grants shrink with it. */
  readonly holders: number
  readonly algorithm: Algorithm
  /** token-bucket: the bucket's size. */
  readonly burst: number
}

/** What the pool granted. */
export interface LeaseGrant {
  /** Tokens granted: 0, or at least the request's `need`. */
  readonly granted: number
  /** Tokens left in the pool for this window after the grant. */
  readonly remaining: number
  /** Milliseconds until the lease ends (its window or slot), by the pool's clock. */
  readonly resetMs: number
  /** The window's (or slot's) start by the pool's clock: it identifies the window a give-back belongs to. */
  readonly windowStart: number
  /** With nothing granted: milliseconds until `need` tokens may be granted, if nobody else takes them. */
  readonly retryMs: number
}

/** Unused tokens going back. */
export interface Giveback {
  readonly key: string
  readonly windowStart: number
  readonly tokens: number
  readonly algorithm: Algorithm
  /** The shape of the rule the tokens were leased under (a give-back to a changed rule is dropped). */
  readonly shape: string
  /** Who gives back, and its sequence number: each (holder, seq) is applied at most once. */
  readonly holder: string
  readonly seq: number
}

/** What a rule's `per` may split on. */
export type PerKey = 'ip' | 'path' | 'method' | `header:${string}`

/** A validated rule, plain data (JSON-safe: it travels to workers and into Redis). */
export interface RuleSpec {
  readonly name: string
  readonly match: {
    readonly ip?: readonly string[]
    readonly path?: readonly string[]
    readonly method?: readonly string[]
    readonly header?: Readonly<Record<string, string>>
  }
  readonly per: readonly PerKey[]
  readonly limit: number
  /** The window as written (`1m`), and in milliseconds. */
  readonly window: string
  readonly windowMs: number
  /** How requests are counted (src/limiter/pool.ts): fixed windows, a sliding window, or a token bucket. */
  readonly algorithm: Algorithm
  /** token-bucket: the most tokens at once (the bucket's size); the others: the limit. */
  readonly burst: number
  /** shadow: counted and reported, never rejects. */
  readonly mode: 'enforce' | 'shadow'
  /** Units a request uses: a number, or a request header's value bounded by `max`. */
  readonly cost: number | { readonly header: string; readonly max: number }
  /** delay: a request over the limit waits for room, up to maxDelayMs, before a 429. */
  readonly onExceed: 'reject' | 'delay'
  readonly maxDelay: string | null
  readonly maxDelayMs: number
  /** While Redis is unusable: lease from this instance's share (local), let requests through (allow), or 503 (deny). */
  readonly whenRedisDown: 'local' | 'allow' | 'deny'
}

/** How many times each rule's counters were reset (absent: 0); JSON-safe, it travels to workers. */
export type Generations = Readonly<Record<string, number>>
