import type { HttpCache } from '../cache/http-cache.js'
import type { Stage } from './pipeline.js'

/**
 * The HTTP cache (src/cache/http-cache.ts): it answers hits itself, and sends misses, revalidations and bypasses
 * upstream through the Upstream it was built with, finishing through the pipeline. Without a cache, the request
 * goes on to the forward stage.
 */
export function cacheStage(cache: HttpCache | null): Stage {
  if (cache === null) return (x, p) => p.next(x)
  return (x) => cache.handle(x)
}
