import { Agent, request } from 'undici'

/** Outcome counts of a load run. */
export interface LoadResult {
  sent: number
  byStatus: Record<number, number>
  errors: string[]
}

/**
 * Sends GETs to `url` from `concurrency` loops until `stop()` resolves, `maxRequests` were sent or `maxMs` passed,
 * whichever comes first: every loop here is bounded in count and time.
 */
export async function steadyLoad(opts: {
  url: string | (() => string)
  concurrency: number
  maxRequests: number
  maxMs: number
  until?: Promise<unknown>
  localAddress?: string
}): Promise<LoadResult> {
  const result: LoadResult = { sent: 0, byStatus: {}, errors: [] }
  const agent = new Agent({
    keepAliveTimeout: 2_000,
    headersTimeout: 10_000,
    bodyTimeout: 10_000,
    ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
  })
  const deadline = Date.now() + opts.maxMs
  let stopped = false
  void opts.until?.then(() => (stopped = true))
  const loop = async (): Promise<void> => {
    while (!stopped && result.sent < opts.maxRequests && Date.now() < deadline) {
      result.sent++
      const url = typeof opts.url === 'string' ? opts.url : opts.url()
      try {
        const res = await request(url, { dispatcher: agent })
        await res.body.dump()
        result.byStatus[res.statusCode] = (result.byStatus[res.statusCode] ?? 0) + 1
      } catch (err) {
        result.errors.push((err as Error).message)
      }
    }
  }
  await Promise.all(Array.from({ length: opts.concurrency }, loop))
  await agent.close()
  return result
}

/** Sums a Prometheus counter over all its series in the exposition text, optionally filtered by a label match. */
export function sumMetric(text: string, name: string, labelFilter?: RegExp): number {
  let sum = 0
  for (const line of text.split('\n')) {
    if (!line.startsWith(name + '{') && !line.startsWith(name + ' ')) continue
    if (labelFilter && !labelFilter.test(line)) continue
    sum += Number(line.slice(line.lastIndexOf(' ') + 1))
  }
  return sum
}
