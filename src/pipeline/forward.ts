import type { FetchOptions } from '../cache/http-cache.js'
import type { Upstream } from './upstream.js'
import type { Stage } from './pipeline.js'

const PLAIN: FetchOptions = { conditional: null, toClient: true, extraHeaders: null, tap: null }

/** The last stage: the request goes to the upstream as it is, and its answer to the client. */
export function forwardStage(upstream: Upstream): Stage {
  return (x, p) => upstream.fetch(x, PLAIN, (result) => p.finish(x, result))
}
