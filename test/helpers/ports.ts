import { readFileSync } from 'node:fs'
import { createServer } from 'node:net'

/** The first port of the kernel's ephemeral range (ip_local_port_range; 32768 unless configured otherwise). */
function ephemeralLow(): number {
  try {
    const low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0])
    return Number.isInteger(low) && low > 0 ? low : 32_768
  } catch {
    return 32_768
  }
}

/** Whether something can listen on `port` of 127.0.0.1 now (port 0: the OS picks one); the port it got, or 0. */
function tryListen(port: number): Promise<number> {
  return new Promise((resolve) => {
    const srv = createServer()
    srv.once('error', () => resolve(0))
    srv.listen(port, '127.0.0.1', () => {
      const addr = srv.address()
      const got = typeof addr === 'object' && addr ? addr.port : 0
      srv.close(() => resolve(got))
    })
  })
}

/** Every port this process handed out: two calls, even at once, never get the same one. */
const handedOut = new Set<number>()

/**
 * A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range, and not given to this
 * process before. A port the OS picks for a listener comes from that range and can be taken next as the source port
 * of an outgoing connection (a client of a Redis Cluster opens many), after which nothing can listen on it; and the
 * OS may pick the same free port for two calls made at once (two instances started together, one's proxy port then
 * the other's admin port: EADDRINUSE).
 */
export async function freePort(): Promise<number> {
  const span = ephemeralLow() - 10_000
  for (let i = 0; i < 200; i++) {
    // (0, the OS's pick, only where the range leaves no room below it)
    const candidate = span >= 1_000 ? 10_000 + Math.floor(Math.random() * span) : 0
    if (candidate !== 0 && handedOut.has(candidate)) continue
    if (candidate !== 0) handedOut.add(candidate) // reserved while it is checked: a call made meanwhile skips it
    const port = await tryListen(candidate)
    if (port !== 0 && (candidate !== 0 || !handedOut.has(port))) {
      handedOut.add(port)
      return port
    }
    if (candidate !== 0) handedOut.delete(candidate)
  }
  throw new Error('no free port on 127.0.0.1')
}
