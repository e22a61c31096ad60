/**
 * Approximate heavy hitters in bounded memory: exact counts for up to 2 x capacity keys; when the map reaches that,
 * it is pruned to its `capacity` largest (O(n log n) once per `capacity` new keys, so O(log n) per key amortised).
 * A key that is pruned and comes back starts again from 0, so counts of keys near the cut are undercounts; the
 * keys that matter (far above the cut) keep exact counts.
 */
export class TopK {
  readonly #capacity: number
  #counts = new Map<string, number>()

  constructor(capacity: number) {
    this.#capacity = capacity
  }

  /** Counts `n` for `key`. */
  add(key: string, n = 1): void {
    const c = this.#counts.get(key)
    if (c !== undefined) {
      this.#counts.set(key, c + n)
      return
    }
    if (this.#counts.size >= 2 * this.#capacity) this.#prune()
    this.#counts.set(key, n)
  }

  /** The keys and counts held, largest first, at most `capacity`. */
  top(): [string, number][] {
    return [...this.#counts].sort((a, b) => b[1] - a[1]).slice(0, this.#capacity)
  }

  get size(): number {
    return this.#counts.size
  }

  #prune(): void {
    this.#counts = new Map(this.top())
  }
}
