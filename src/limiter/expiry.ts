/**
 * Keys due to expire, by the second: a timing wheel. Sweeping visits only the keys whose second has come, a bounded
 * number per call, so a table of a million buckets is swept in small steps and never walked whole.
 *
 * Scheduling is lazy: a key is filed under one second at a time. When that second comes, `visit` says whether the
 * key is done (dropped) or when to look again (refiled); so a key whose expiry moved later needs no work until then.
 */
export class ExpiryWheel {
  readonly #slots = new Map<number, string[]>()
  /** The earliest second that may still hold keys. */
  #next = Infinity

  /** Files `key` to be visited once `at` (ms) has passed. */
  schedule(key: string, at: number): void {
    const second = Math.ceil(at / 1_000)
    let list = this.#slots.get(second)
    if (list === undefined) {
      list = []
      this.#slots.set(second, list)
    }
    list.push(key)
    if (second < this.#next) this.#next = second
  }

  /**
   * Visits at most `max` due keys, and stops once `budgetMs` has passed (checked every 256 keys); `visit` returns null
   * when the key is done, or when (ms) to look again. Returns how many were visited.
   */
  sweep(now: number, max: number, budgetMs: number, visit: (key: string) => number | null): number {
    const last = Math.floor(now / 1_000)
    const stopAt = performance.now() + budgetMs
    let visited = 0
    while (this.#next <= last && visited < max) {
      if ((visited & 255) === 255 && performance.now() > stopAt) break
      const second = this.#next
      const list = this.#slots.get(second)
      if (list === undefined || list.length === 0) {
        // Seconds are consecutive: step to the next one (a sweep runs every second, so this loop is short).
        this.#slots.delete(second)
        this.#next = this.#slots.size === 0 ? Infinity : second + 1
        continue
      }
      while (list.length > 0 && visited < max) {
        if ((visited & 255) === 255 && performance.now() > stopAt) return visited
        const key = list.pop()!
        visited++
        const again = visit(key)
        if (again !== null) this.schedule(key, Math.max(again, now + 1))
      }
    }
    return visited
  }

  /** Keys filed (a key filed twice counts twice). */
  get size(): number {
    let n = 0
    for (const list of this.#slots.values()) n += list.length
    return n
  }
}
