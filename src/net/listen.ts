import { createServer } from 'node:net'

/** The error code listening on `host:port` gives now (EADDRINUSE, EACCES, ...), or null when it listens; closed again. */
export function listenError(port: number, host: string): Promise<string | null> {
  return new Promise((resolve) => {
    const probe = createServer()
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message))
    probe.listen(port, host, () => probe.close(() => resolve(null)))
  })
}

/**
 * Why this process can never listen on `host:port` as configured, or null: EACCES (a port below 1024 without root or
 * CAP_NET_BIND_SERVICE) or EADDRNOTAVAIL (an address this machine does not have), as one phrase. Only the operator can
 * fix those, so the primary says so once at start instead of starting workers that fail to listen one after another.
 * A port in use (EADDRINUSE) is not such a reason: its holder may go away, and the workers retry with backoff.
 */
export async function unusableAddress(port: number, host: string): Promise<string | null> {
  return unusableBecause(await listenError(port, host), port, host)
}

/** unusableAddress for the error code `code` (from listenError) that listening on `host:port` gave. */
export function unusableBecause(code: string | null, port: number, host: string): string | null {
  const reason = PERMANENT[code ?? '']
  return reason === undefined ? null : `cannot listen on ${host}:${port}: ${reason}`
}

const PERMANENT: Record<string, string> = {
  EACCES: 'permission denied (EACCES: a port below 1024 needs root or CAP_NET_BIND_SERVICE)',
  EADDRNOTAVAIL: 'this machine has no such address (EADDRNOTAVAIL)',
}
