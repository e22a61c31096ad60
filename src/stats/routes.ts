import { ConfigError } from '../errors.js'

/**
 * Route names for statistics: a path with its IDs replaced, so `/categories/MLA97994` and `/categories/MLA1051`
 * count as one route, `/categories/:id`. Operators may list patterns (`statsRoutes` in the config file):
 * segments are literal, `:name` (any one segment) or a final `*` (any rest). A path no pattern matches keeps its
 * literal segments, except that a segment holding a digit becomes `:id`.
 */

/** Routes remembered per worker (path -> route); beyond that the cache is cleared and rebuilt. */
const MEMO_SIZE = 10_000
const HAS_DIGIT = /\d/

/** Validates the `statsRoutes` file section: a list of patterns starting with `/`. */
export function parseRoutePatterns(raw: unknown): string[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) throw new ConfigError('statsRoutes', 'must be a list of route patterns such as /items/:id')
  return raw.map((p: unknown, i) => {
    if (typeof p !== 'string' || !p.startsWith('/')) {
      throw new ConfigError(`statsRoutes[${i}]`, `${JSON.stringify(p)} is not a route pattern starting with /`)
    }
    const segments = p.split('/').slice(1)
    if (segments.slice(0, -1).includes('*')) throw new ConfigError(`statsRoutes[${i}]`, `"${p}": * may only end a pattern`)
    return p
  })
}

/** Turns request paths into route names. */
export class RouteNamer {
  readonly #patterns: { readonly pattern: string; readonly segments: readonly string[] }[]
  readonly #memo = new Map<string, string>()

  constructor(patterns: readonly string[]) {
    this.#patterns = patterns.map((pattern) => ({ pattern, segments: pattern.split('/').slice(1) }))
  }

  /** The route of a path (without query). */
  name(path: string): string {
    let route = this.#memo.get(path)
    if (route === undefined) {
      route = this.#compute(path)
      if (this.#memo.size >= MEMO_SIZE) this.#memo.clear()
      this.#memo.set(path, route)
    }
    return route
  }

  #compute(path: string): string {
    const segments = path.split('/').slice(1)
    for (const p of this.#patterns) if (matches(p.segments, segments)) return p.pattern
    return '/' + segments.map((s) => (HAS_DIGIT.test(s) ? ':id' : s)).join('/')
  }
}

function matches(pattern: readonly string[], segments: readonly string[]): boolean {
  for (let i = 0; i < pattern.length; i++) {
    const p = pattern[i]!
    if (p === '*' && i === pattern.length - 1) return segments.length >= pattern.length - 1
    if (i >= segments.length) return false
    if (p.startsWith(':')) {
      if (segments[i] === '') return false
    } else if (p !== segments[i]) return false
  }
  return pattern.length === segments.length
}
