import { ExpiryWheel } from './expiry.js'
import type { Algorithm, Giveback, LeaseGrant, LeaseRequest } from './types.js'

/**
 * The lease contract every limiter store keeps (Redis, the primary's memory), and the in-memory implementation.
 *
 * A pool holds one count per bucket and window. A holder (a worker) asks for up to `want` tokens of a bucket, and at
 * least `need` (its request's cost); the pool grants `need` or more, or nothing, in one atomic step and counts them as
 * used. The holder admits requests against the tokens in hand without asking again (src/limiter/leases.ts) and gives
 * back what it did not use. The pool never grants more than `limit` in a window, so no arrangement of holders can
 * admit more than `limit` (the hard guarantee).
 *
 * Three algorithms, each granting atomically from its own state:
 * - fixed: windows aligned to the pool's clock: a window of W ms holds [k*W, (k+1)*W).
 * - sliding: W is cut into SLIDING_SLOTS slots; a lease belongs to the current slot, and a grant is allowed only while
 *   the current slot plus the SLIDING_SLOTS before it hold at most `limit`. Any span of W ms lies within such
 *   SLIDING_SLOTS + 1 consecutive slots, and a slot's tokens are used only in that slot, so no span of W ever admits
 *   more than `limit` (conservative: after a burst, room comes back up to one slot, W / SLIDING_SLOTS, later).
 * - token-bucket: a bucket of `burst` tokens refilled at `limit` per W, leased in short slots (bucketSlotMs). A lease
 *   granted in a slot lasts until the end of the next one (so a lease is never shorter than a slot, whatever the round
 *   trip); the pool counts what it granted in the current and the previous slot as held and refills the bucket only up
 *   to `burst - held`: tokens in the bucket plus tokens in hand never exceed `burst`, so no span of T ms admits more
 *   than burst + rate x T. The `need` tokens of a grant are not held: they go to the request that asked, which the
 *   holder decides at once on receipt (or drops them), so they count as used at the instant of the grant. The slot is
 *   short enough that the cap costs little of the rate (bucketSlotMs says how much).
 *
 * A bucket's state remembers the shape of the rule that made it (algorithm, limit, window, burst). When a request
 * comes with another shape (the rule changed), what the old shape counted within the new rule's reach (its current
 * fixed window, its sliding window, the time its bucket takes to fill) is carried into the new one (fixed: its count;
 * sliding: the current slot; token bucket: taken from the level), so a changed rule starts from a state that cannot
 * admit more than the new rule allows. For SHAPE_SETTLE_MS after a change, a request still under the shape before it
 * (a holder that has not heard of the change yet) is refused rather than converting the bucket back.
 *
 * Give-backs carry the holder's id and a sequence number and are applied at most once per (holder, sequence): a
 * give-back delivered twice (a client that re-sends after a dropped connection) is counted once.
 */

/** Slots of a sliding window (src/limiter/redis-pool.ts uses the same number). */
export const SLIDING_SLOTS = 10
/** Bounds of a token bucket's lease slot. */
export const MIN_BUCKET_SLOT_MS = 5
export const MAX_BUCKET_SLOT_MS = 500

/**
 * A token bucket's lease slot. A lease granted in a slot lasts until the next slot ends, and the bucket refills only
 * up to burst - (tokens granted in the current and previous slot) meanwhile, so a grant can hold the refill back for
 * up to two slots: a hundredth of a token's interval keeps that loss at 2% of the rate, between MIN_BUCKET_SLOT_MS
 * (a lease must outlast its round trip) and MAX_BUCKET_SLOT_MS. The sustained rate is at least
 * rate / (1 + 2 x rate x slot) (less the gaps between requests and the round trip), and while fewer than
 * burst - 2 x rate x slot - 1 tokens are taken per two slots the cap does not bind at all.
 */
export function bucketSlotMs(limit: number, windowMs: number, burst: number): number {
  void burst
  return Math.min(MAX_BUCKET_SLOT_MS, Math.max(MIN_BUCKET_SLOT_MS, Math.floor(windowMs / limit / 100)))
}

/** After a rule changes shape, requests under the shape before it are refused this long (the change reaching holders). */
export const SHAPE_SETTLE_MS = 10_000

/** Where a rule's counting reaches back from `now`: what an earlier rule counted after this still matters. */
export function horizonOf(algorithm: Algorithm, limit: number, windowMs: number, burst: number, now: number): number {
  if (algorithm === 'fixed') return now - (now % windowMs)
  if (algorithm === 'sliding') {
    const slotMs = windowMs / SLIDING_SLOTS
    return now - (now % slotMs) - windowMs
  }
  return now - Math.ceil((burst * windowMs) / limit)
}

/** The shape of a rule as a bucket's state records it: a changed shape carries the old count over. */
export function shapeOf(algorithm: Algorithm, limit: number, windowMs: number, burst: number): string {
  return `${algorithm}/${limit}/${windowMs}/${burst}`
}

/** A place counts are kept: Redis, or the primary (in its memory, or over IPC from a worker). */
export interface LeasePool {
  acquire(req: LeaseRequest): Promise<LeaseGrant>
  /** Gives back unused tokens of a window (ignored once that window is over). Fire and forget. */
  release(g: Giveback): void
}

/**
 * How many tokens to grant when `left` remain: at most a quarter of an even share per holder, at least `need`, never
 * more than asked; nothing when fewer than `need` are left. A bucket near its limit is decided one request at a time;
 * a big one leases in blocks. (The Redis script does the same arithmetic in Lua: keep the two in step.)
 */
export function grantSize(left: number, want: number, holders: number, need = 1): number {
  if (left < need || left <= 0) return 0
  return Math.max(need, Math.min(want, left, Math.max(1, Math.floor(left / (4 * holders)))))
}

interface Entry {
  shape: string
  /** The shape before the last change, and when the change came. */
  prevShape: string | null
  shapeSince: number
  algorithm: Algorithm
  limit: number
  windowMs: number
  burst: number
  /** fixed: the window's start and the tokens granted in it. */
  start: number
  count: number
  /** sliding: tokens granted per slot start. */
  slots: Map<number, number> | null
  /** token-bucket: tokens in the bucket (`level`, as of `at`), the current slot, and the tokens granted in it and in
   * the slot before (their leases have not ended). */
  level: number
  at: number
  slot: number
  held: number
  prev: number
  /** The last give-back sequence applied, per holder. */
  seqs: Map<string, number> | null
  /** When forgetting the entry changes nothing (a new one would start the same). */
  idleAt: number
}

/** How soon a holder under a superseded rule shape may ask again. */
export const STALE_RETRY_MS = 200

/** The pool in this process's memory (the primary's): synchronous, so every grant is atomic. */
export class MemoryPool {
  readonly #entries = new Map<string, Entry>()
  readonly #wheel = new ExpiryWheel()
  readonly #now: () => number

  constructor(now: () => number = Date.now) {
    this.#now = now
  }

  /** Grants `req.need` to `req.want` tokens of the bucket, or none. */
  acquire(req: LeaseRequest): LeaseGrant {
    const now = this.#now()
    const shape = shapeOf(req.algorithm, req.limit, req.windowMs, req.burst)
    let e = this.#entries.get(req.key)
    if (e === undefined) {
      e = fresh(req, shape, now, 0)
      this.#entries.set(req.key, e)
      this.#wheel.schedule(req.key, now + req.windowMs)
    } else if (e.shape !== shape) {
      if (shape === e.prevShape && now - e.shapeSince < SHAPE_SETTLE_MS) {
        // A holder still under the rule before the last change: refused until it hears of the new one.
        return { granted: 0, remaining: 0, resetMs: STALE_RETRY_MS, windowStart: -1, retryMs: STALE_RETRY_MS }
      }
      const carried = used(e, now, horizonOf(req.algorithm, req.limit, req.windowMs, req.burst, now))
      Object.assign(e, fresh(req, shape, now, carried), { seqs: e.seqs, prevShape: e.shape, shapeSince: now })
    }
    const g = req.algorithm === 'sliding' ? sliding(e, req, now) : req.algorithm === 'token-bucket' ? tokenBucket(e, req, now) : fixed(e, req, now)
    e.idleAt = idleAt(e, now)
    return g
  }

  /** Takes back unused tokens of the window or slot they came from, once. */
  release(g: Giveback): void {
    const e = this.#entries.get(g.key)
    if (e === undefined || e.shape !== g.shape) return
    const seqs = (e.seqs ??= new Map())
    if ((seqs.get(g.holder) ?? 0) >= g.seq) return
    seqs.set(g.holder, g.seq)
    const now = this.#now()
    if (e.algorithm === 'token-bucket') {
      // Tokens of a lease that has not ended go back (granted in the current slot, or the one before); after that
      // they count as used.
      if (e.slot === g.windowStart) {
        const back = Math.min(g.tokens, e.held)
        e.held -= back
        e.level += back
      } else if (e.slot - bucketSlotMs(e.limit, e.windowMs, e.burst) === g.windowStart) {
        const back = Math.min(g.tokens, e.prev)
        e.prev -= back
        e.level += back
      }
    } else if (e.algorithm === 'sliding') {
      const slots = (e.slots ??= new Map())
      slots.set(g.windowStart, Math.max(0, (slots.get(g.windowStart) ?? 0) - g.tokens))
    } else if (e.start === g.windowStart) e.count = Math.max(0, e.count - g.tokens)
    e.idleAt = Math.max(e.idleAt, idleAt(e, now))
  }

  /**
   * Forgets buckets whose state no longer matters, visiting at most `max` of those due and stopping after `budgetMs`
   * (call every second or so: each call's work is bounded, and only buckets due to expire are looked at).
   */
  sweep(max = 20_000, budgetMs = 3): number {
    const now = this.#now()
    return this.#wheel.sweep(now, max, budgetMs, (key) => {
      const e = this.#entries.get(key)
      if (e === undefined) return null
      if (e.idleAt <= now) {
        this.#entries.delete(key)
        return null
      }
      return e.idleAt
    })
  }

  /** Drops the buckets of one rule, or one bucket when `bucket` is given; returns how many were dropped. */
  reset(rule: string, bucket?: string): number {
    if (bucket !== undefined) return this.#entries.delete(bucket) ? 1 : 0
    let n = 0
    for (const key of this.#entries.keys()) {
      if (key === rule || key.startsWith(rule + '|') || key.startsWith(rule + '#') || key.startsWith(rule + '~')) {
        this.#entries.delete(key)
        n++
      }
    }
    return n
  }

  /** How many buckets are held. */
  get size(): number {
    return this.#entries.size
  }
}

/** A new bucket state of the request's shape, with `carried` units already counted now. */
function fresh(req: LeaseRequest, shape: string, now: number, carried: number): Entry {
  const e: Entry = {
    shape,
    prevShape: null,
    shapeSince: now,
    algorithm: req.algorithm,
    limit: req.limit,
    windowMs: req.windowMs,
    burst: req.burst,
    start: -1,
    count: 0,
    slots: null,
    level: req.burst,
    at: now,
    slot: -1,
    held: 0,
    prev: 0,
    seqs: null,
    idleAt: now,
  }
  if (carried > 0) {
    if (req.algorithm === 'fixed') {
      e.start = now - (now % req.windowMs)
      e.count = carried
    } else if (req.algorithm === 'sliding') {
      const slotMs = req.windowMs / SLIDING_SLOTS
      e.slots = new Map([[now - (now % slotMs), carried]])
    } else e.level = Math.max(0, req.burst - carried)
  }
  return e
}

/**
 * What the entry's own shape counted after `horizon` (where the new rule's counting reaches back to): a fixed window
 * that ends after it counts whole, a sliding window the slots that end after it, a token bucket what it lacks now.
 */
function used(e: Entry, now: number, horizon: number): number {
  if (e.algorithm === 'fixed') return e.start >= 0 && e.start + e.windowMs > horizon ? e.count : 0
  if (e.algorithm === 'sliding') {
    // The slots the old rule still counts (its window) that end after the horizon.
    const slotMs = e.windowMs / SLIDING_SLOTS
    const oldest = now - (now % slotMs) - e.windowMs
    let n = 0
    for (const [start, c] of e.slots ?? []) if (start >= oldest && start + slotMs > horizon) n += c
    return n
  }
  return Math.max(0, Math.ceil(e.burst - refilled(e, now) - 1e-9))
}

/**
 * A token bucket's level now: while the leases of the current and previous slot last it refills only to
 * burst - held - prev; once the previous slot's leases end (the current slot's end), to burst - held; once those end
 * too (the next slot's end), to burst.
 */
function refilled(e: Entry, now: number): number {
  if (e.slot < 0) return e.level
  const fill = (level: number, from: number, to: number, cap: number): number => (level >= cap ? level : Math.min(cap, level + ((to - from) * e.limit) / e.windowMs))
  const slotMs = bucketSlotMs(e.limit, e.windowMs, e.burst)
  const end1 = e.slot + slotMs
  const end2 = end1 + slotMs
  let level = fill(e.level, e.at, Math.min(now, end1), e.burst - e.held - e.prev)
  if (now <= end1) return level
  level = fill(level, end1, Math.min(now, end2), e.burst - e.held)
  if (now <= end2) return level
  return fill(level, end2, now, e.burst)
}

/** When forgetting the entry changes nothing. */
function idleAt(e: Entry, now: number): number {
  if (e.algorithm === 'fixed') return e.start + e.windowMs
  if (e.algorithm === 'sliding') {
    const slotMs = e.windowMs / SLIDING_SLOTS
    let last = now
    for (const start of e.slots?.keys() ?? []) last = Math.max(last, start + slotMs + e.windowMs)
    return last
  }
  const leasesEnd = e.slot + 2 * bucketSlotMs(e.limit, e.windowMs, e.burst)
  return Math.max(leasesEnd, now) + Math.ceil((e.burst - e.level) * (e.windowMs / e.limit))
}

function fixed(e: Entry, req: LeaseRequest, now: number): LeaseGrant {
  const start = now - (now % req.windowMs)
  if (e.start !== start) {
    e.start = start
    e.count = 0
  }
  const granted = grantSize(req.limit - e.count, req.want, req.holders, req.need)
  e.count += granted
  const resetMs = start + req.windowMs - now
  return { granted, remaining: Math.max(0, req.limit - e.count), resetMs, windowStart: start, retryMs: granted > 0 ? 0 : resetMs }
}

function sliding(e: Entry, req: LeaseRequest, now: number): LeaseGrant {
  const slotMs = req.windowMs / SLIDING_SLOTS
  const slot = now - (now % slotMs)
  const oldest = slot - SLIDING_SLOTS * slotMs
  const slots = (e.slots ??= new Map())
  let used = 0
  for (const [start, n] of slots) {
    if (start < oldest) slots.delete(start)
    else used += n
  }
  const granted = grantSize(req.limit - used, req.want, req.holders, req.need)
  if (granted > 0) slots.set(slot, (slots.get(slot) ?? 0) + granted)
  const resetMs = slot + slotMs - now
  let retryMs = 0
  if (granted === 0) {
    // Full: room for `need` comes back when enough of the oldest slots leave the window (a slot counts until a window
    // after its end).
    retryMs = resetMs
    let left = used
    for (const start of [...slots.keys()].sort((a, b) => a - b)) {
      left -= slots.get(start)!
      if (req.limit - left >= req.need) {
        retryMs = Math.max(retryMs, start + slotMs + req.windowMs - now)
        break
      }
    }
  }
  return { granted, remaining: Math.max(0, req.limit - used - granted), resetMs, windowStart: slot, retryMs }
}

function tokenBucket(e: Entry, req: LeaseRequest, now: number): LeaseGrant {
  const perMs = req.limit / req.windowMs
  const slotMs = bucketSlotMs(req.limit, req.windowMs, req.burst)
  const slot = now - (now % slotMs)
  e.level = refilled(e, now)
  if (e.slot !== slot) {
    // The leases of the slot before the current one have ended; those of the current one become the previous ones.
    e.prev = e.slot >= 0 && e.slot + slotMs === slot ? e.held : 0
    e.held = 0
    e.slot = slot
  }
  e.at = now
  const granted = grantSize(Math.floor(e.level), req.want, req.holders, req.need)
  e.level -= granted
  // The `need` tokens go to the request that asked, at once: used now, not held. Only the rest is held in hand.
  if (granted > 0) e.held += granted - req.need
  // A lease lasts until the next slot ends.
  const resetMs = slot + 2 * slotMs - now
  const retryMs = granted > 0 ? 0 : bucketRetryMs(e.level, e.held, e.prev, req.need, req.burst, perMs, slot + slotMs - now, slotMs)
  return { granted, remaining: Math.max(0, Math.floor(e.level)), resetMs, windowStart: slot, retryMs }
}

/**
 * When `need` tokens can be granted, if nobody takes any meanwhile: the bucket fills to burst - held - prev until the
 * current slot ends, to burst - held until the next one ends, then to burst.
 */
export function bucketRetryMs(level: number, held: number, prev: number, need: number, burst: number, perMs: number, slotLeftMs: number, slotMs: number): number {
  const segments: [number, number][] = [
    [slotLeftMs, burst - held - prev],
    [slotMs, burst - held],
  ]
  let t = 0
  for (const [length, cap] of segments) {
    if (cap >= need) {
      const wait = Math.max(0, (need - level) / perMs)
      if (wait <= length) return Math.max(1, Math.ceil(t + wait))
    }
    level = level >= cap ? level : Math.min(cap, level + length * perMs)
    t += length
  }
  return Math.max(1, Math.ceil(t + Math.max(0, (need - level) / perMs)))
}

/** A MemoryPool behind the asynchronous LeasePool contract (tests, and the simulation). */
export class LocalPool implements LeasePool {
  constructor(readonly memory: MemoryPool) {}

  acquire(req: LeaseRequest): Promise<LeaseGrant> {
    return Promise.resolve(this.memory.acquire(req))
  }

  release(g: Giveback): void {
    this.memory.release(g)
  }
}
