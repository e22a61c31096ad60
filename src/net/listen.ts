import { createServer } from 'node:net'

/**
 * Why this process can never listen on `host:port` as configured, or null: EACCES (a port below 1024 without root or
 * CAP_NET_BIND_SERVICE) or EADDRNOTAVAIL (an address this machine does not have), as one phrase. Only the operator can
 * fix those, so the primary says so once at start instead of starting workers that fail to listen one after another.
 * A port in use (EADDRINUSE) is not such a reason: its holder may go away, and the workers retry with backoff.
 */
export function unusableAddress(port: number, host: string): Promise<string | null> {
  return new Promise((resolve) => {
    const probe = createServer()
    probe.once('error', (err: NodeJS.ErrnoException) => {
      const reason = PERMANENT[err.code ?? '']
      resolve(reason === undefined ? null : `cannot listen on ${host}:${port}: ${reason}`)
    })
    probe.listen(port, host, () => probe.close(() => resolve(null)))
  })
}

const PERMANENT: Record<string, string> = {
  EACCES: 'permission denied (EACCES: a port below 1024 needs root or CAP_NET_BIND_SERVICE)',
  EADDRNOTAVAIL: 'this machine has no such address (EADDRNOTAVAIL)',
}
