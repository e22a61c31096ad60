import type { HttpCache } from '../cache/http-cache.js'
import type { Stage } from './pipeline.js'

/**
 * The HTTP cache (src/cache/http-cache.ts): it answers hits itself and hands misses, revalidations and bypasses on
 * to the upstream stage, with its fill (src/cache/fill.ts) on the exchange to watch the answer. Null without a cache:
 * the stage is left out.
 */
export function cacheStage(cache: HttpCache | null): Stage | null {
  if (cache === null) return null
  return (x, p) => cache.handle(x, p)
}
