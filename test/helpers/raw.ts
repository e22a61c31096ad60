import { connect } from 'node:net'

/**
 * Sends bytes exactly as given over a fresh TCP connection and returns everything the server sent until it
 * closed the connection or `ms` passed (for requests an HTTP client library would refuse to send).
 */
export function rawExchange(port: number, bytes: string, ms = 3_000, localAddress?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ port, host: '127.0.0.1', localAddress })
    let out = ''
    const timer = setTimeout(() => {
      socket.destroy()
      resolve(out)
    }, ms)
    socket.on('data', (c: Buffer) => (out += c.toString('latin1')))
    socket.on('error', (err) => {
      clearTimeout(timer)
      if (out) resolve(out)
      else reject(err)
    })
    socket.on('close', () => {
      clearTimeout(timer)
      resolve(out)
    })
    socket.write(bytes)
  })
}

/** A raw connection to `port` that keeps what it receives and whether it closed; `answers`: 200 responses seen. */
export function rawClient(port: number) {
  const s = connect({ port, host: '127.0.0.1' })
  let got = ''
  let closed = false
  s.on('error', () => {})
  s.on('close', () => (closed = true))
  s.on('data', (c: Buffer) => (got += c.toString('latin1')))
  return { s, got: () => got, closed: () => closed, answers: () => got.split('HTTP/1.1 200 ').length - 1 }
}

/** The status code and body of a raw HTTP/1.1 response text (body as sent, not de-chunked). */
export function parseRaw(text: string): { status: number; head: string; body: string } {
  const split = text.indexOf('\r\n\r\n')
  const head = split === -1 ? text : text.slice(0, split)
  const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(head)?.[1] ?? 0)
  return { status, head, body: split === -1 ? '' : text.slice(split + 4) }
}
