import { connect, createServer, type Socket } from 'node:net'
import type { AddressInfo } from 'node:net'

/**
 * A TCP relay on 127.0.0.1 in front of a real server, for network faults a test must place exactly: it can hold back
 * the server's answers (the request arrives and is applied, its reply does not come back) and then cut every
 * connection, as a dropped link would.
 */
export interface Relay {
  readonly port: number
  /** Everything clients sent through the relay, as latin1 text. */
  sent(): string
  /** From now on, the server's answers are not passed on (they are dropped). */
  holdReplies(): void
  /** Cuts every connection open now; connections made later relay both ways again. */
  cut(): void
  close(): Promise<void>
}

/** Starts a relay to `targetPort` on 127.0.0.1. */
export async function startRelay(targetPort: number): Promise<Relay> {
  const pairs = new Set<[Socket, Socket]>()
  let text = ''
  let holding = false
  const server = createServer((client) => {
    const upstream = connect({ port: targetPort, host: '127.0.0.1' })
    const pair: [Socket, Socket] = [client, upstream]
    pairs.add(pair)
    client.on('data', (c: Buffer) => {
      text += c.toString('latin1')
      upstream.write(c)
    })
    upstream.on('data', (c: Buffer) => {
      if (!holding) client.write(c)
    })
    const end = (): void => {
      pairs.delete(pair)
      client.destroy()
      upstream.destroy()
    }
    client.on('close', end)
    upstream.on('close', end)
    client.on('error', end)
    upstream.on('error', end)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return {
    port: (server.address() as AddressInfo).port,
    sent: () => text,
    holdReplies: () => {
      holding = true
    },
    cut: () => {
      for (const [client, upstream] of [...pairs]) {
        client.destroy()
        upstream.destroy()
      }
      pairs.clear()
      holding = false
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const [client, upstream] of pairs) {
          client.destroy()
          upstream.destroy()
        }
        server.close(() => resolve())
      }),
  }
}
