import type { BreakerState } from './types.js'
/**
 * A circuit breaker for the upstream (one per worker). Closed: requests flow and outcomes are counted. It opens after
 * `failures` consecutive failures, or when at least `minRequests` requests in the last `windowMs` failed at a ratio of
 * `errorRatio` or more. Open: every request is refused at once for `openMs`. Then half-open: one probe at a time goes
 * through; a success closes the breaker, a failure opens it again.
 */

export interface BreakerOptions {
  /** Consecutive failures that open it; 0 turns the breaker off. */
  readonly failures: number
  readonly errorRatio: number
  readonly windowMs: number
  readonly minRequests: number
  readonly openMs: number
}

/** Per-second slots of the error-ratio window. */
const SLOT_MS = 1_000

export class CircuitBreaker {
  readonly #options: BreakerOptions
  readonly #now: () => number
  readonly #onChange: (state: BreakerState) => void
  #state: BreakerState = 'closed'
  #consecutive = 0
  #openUntil = 0
  #probing = false
  readonly #slots: { start: number; total: number; failed: number }[]

  constructor(options: BreakerOptions, onChange: (state: BreakerState) => void, now: () => number = Date.now) {
    this.#options = options
    this.#onChange = onChange
    this.#now = now
    this.#slots = Array.from({ length: Math.max(1, Math.ceil(options.windowMs / SLOT_MS)) }, () => ({ start: -1, total: 0, failed: 0 }))
  }

  get state(): BreakerState {
    return this.#state
  }

  /** Milliseconds until an open breaker lets a probe through (0 unless open). */
  get retryAfterMs(): number {
    return this.#state === 'open' ? Math.max(0, this.#openUntil - this.#now()) : 0
  }

  /**
   * Asks to send a request: true to go ahead (the caller then reports its outcome with `record`), false to refuse it.
   * In half-open state only one probe is out at a time.
   */
  allow(): boolean {
    if (this.#options.failures === 0 || this.#state === 'closed') return true
    if (this.#state === 'open') {
      if (this.#now() < this.#openUntil) return false
      this.#set('half-open')
    }
    if (this.#probing) return false
    this.#probing = true
    return true
  }

  /** A request `allow()` let through ended without an outcome (its client left): frees the probe slot. */
  release(): void {
    if (this.#state === 'half-open') this.#probing = false
  }

  /** Reports the outcome of a request `allow()` let through. */
  record(ok: boolean): void {
    if (this.#options.failures === 0) return
    if (this.#state === 'half-open') {
      this.#probing = false
      if (ok) this.#close()
      else this.#open()
      return
    }
    if (this.#state === 'open') return // a request sent before it opened
    const slot = this.#slot()
    slot.total++
    if (ok) {
      this.#consecutive = 0
      return
    }
    slot.failed++
    this.#consecutive++
    if (this.#consecutive >= this.#options.failures || this.#ratioTripped()) this.#open()
  }

  #ratioTripped(): boolean {
    const since = this.#now() - this.#options.windowMs
    let total = 0
    let failed = 0
    for (const s of this.#slots) {
      if (s.start > since) {
        total += s.total
        failed += s.failed
      }
    }
    return total >= this.#options.minRequests && failed / total >= this.#options.errorRatio
  }

  #slot(): { start: number; total: number; failed: number } {
    const now = this.#now()
    const start = now - (now % SLOT_MS)
    const slot = this.#slots[Math.floor(start / SLOT_MS) % this.#slots.length]!
    if (slot.start !== start) {
      slot.start = start
      slot.total = 0
      slot.failed = 0
    }
    return slot
  }

  #open(): void {
    this.#openUntil = this.#now() + this.#options.openMs
    this.#set('open')
  }

  #close(): void {
    this.#consecutive = 0
    for (const s of this.#slots) s.start = -1
    this.#set('closed')
  }

  #set(state: BreakerState): void {
    if (this.#state === state) return
    this.#state = state
    this.#onChange(state)
  }
}
