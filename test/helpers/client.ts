import { Agent, request } from 'undici'

/** A response, read whole. */
export interface Got {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: string
}

const agents = new Map<string, Agent>()

/** An HTTP agent whose connections leave from `localAddress` (a 127.0.0.x address plays a distinct client). */
export function agentFor(localAddress = '127.0.0.1'): Agent {
  let a = agents.get(localAddress)
  if (a === undefined) {
    a = new Agent({ localAddress, keepAliveTimeout: 2_000, headersTimeout: 10_000, bodyTimeout: 10_000 })
    agents.set(localAddress, a)
  }
  return a
}

/** GET (or another method) from a given source address. */
export async function send(
  url: string,
  opts: { from?: string; method?: string; headers?: Record<string, string> } = {},
): Promise<Got> {
  const res = await request(url, {
    method: (opts.method ?? 'GET') as 'GET',
    headers: opts.headers,
    dispatcher: agentFor(opts.from),
  })
  return { status: res.statusCode, headers: res.headers, body: await res.body.text() }
}

/** Closes every agent made by agentFor (call in teardown). */
export async function closeAgents(): Promise<void> {
  const all = [...agents.values()]
  agents.clear()
  await Promise.all(all.map((a) => a.close()))
}

/** Counts of statuses over `n` requests made with at most `concurrency` in flight. */
export async function burst(
  n: number,
  concurrency: number,
  make: (i: number) => Promise<Got>,
): Promise<{ byStatus: Record<number, number>; errors: string[] }> {
  const byStatus: Record<number, number> = {}
  const errors: string[] = []
  let next = 0
  const lane = async (): Promise<void> => {
    while (next < n) {
      const i = next++
      try {
        const r = await make(i)
        byStatus[r.status] = (byStatus[r.status] ?? 0) + 1
      } catch (err) {
        errors.push((err as Error).message)
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, lane))
  return { byStatus, errors }
}

/** Waits, if needed, so that at least `marginMs` remain before the current fixed window of `windowMs` ends. */
export async function awayFromWindowEdge(windowMs: number, marginMs: number): Promise<void> {
  const left = windowMs - (Date.now() % windowMs)
  if (left < marginMs) await new Promise((r) => setTimeout(r, left + 50))
}
