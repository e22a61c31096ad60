import { readFileSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import t from 'tap'
import { closeAgents, send } from '../helpers/client.js'
import { admin, startMeliproxy, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { sumMetric } from '../helpers/load.js'
import { parseRaw, rawClient, rawExchange } from '../helpers/raw.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * Hostile input over raw sockets against the real binary: every case gets a clear 4xx (or a closed connection),
 * nothing malformed reaches the upstream, and no worker dies.
 */

let upstream: TestUpstream
let proxy: RunningProxy
let pidsAtStart: number[]

t.before(async () => {
  upstream = await startUpstream()
  proxy = await startMeliproxy([
    '--upstream', upstream.url, '--max-body-size', '1kb', '--max-url-length', '2048',
    '--client-headers-timeout', '1s', '--client-request-timeout', '3s',
  ])
  pidsAtStart = proxy.workerPids().sort()
})
t.teardown(async () => {
  await proxy?.stop()
  await closeAgents()
  await upstream?.close()
})

const HOST = 'Host: x\r\n'

// Each of these is answered and closed: the deadline only matters when the proxy is slow (a busy machine).
async function raw(bytes: string, ms = 15_000): Promise<{ status: number; body: string; head: string }> {
  return parseRaw(await rawExchange(proxy.port, bytes, ms))
}

const refused: [string, string, number, string | null][] = [
  ['Content-Length with Transfer-Encoding', `POST /echo/a HTTP/1.1\r\n${HOST}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 400, 'bad_request'],
  ['two different Content-Lengths', `POST /echo/a HTTP/1.1\r\n${HOST}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!`, 400, 'bad_request'],
  ['an obs-folded header', `GET /echo/a HTTP/1.1\r\n${HOST}X-Long: one\r\n two\r\n\r\n`, 400, 'bad_request'],
  ['a bad chunk size', `POST /echo/a HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n`, 400, 'bad_request'],
  ['a CR inside a header value', `GET /echo/a HTTP/1.1\r\n${HOST}X-A: a\rb\r\n\r\n`, 400, 'bad_request'],
  ['a LF inside a header value', `GET /echo/a HTTP/1.1\r\n${HOST}X-A: a\nX-Injected: b\r\n\r\n`, 400, null],
  ['an absolute-form target for another host', `GET http://evil.example/x HTTP/1.1\r\n${HOST}\r\n`, 400, 'bad_request'],
  ['CONNECT', `CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n`, 405, 'method_not_allowed'],
  ['a .. segment', `GET /echo/../admin HTTP/1.1\r\n${HOST}\r\n`, 400, 'bad_request'],
  ['a percent-encoded .. segment', `GET /echo/%2e%2E/admin HTTP/1.1\r\n${HOST}\r\n`, 400, 'bad_request'],
  ['invalid percent-encoding', `GET /echo/%zz HTTP/1.1\r\n${HOST}\r\n`, 400, 'bad_request'],
  ['a truncated percent-encoding', `GET /echo/a%4 HTTP/1.1\r\n${HOST}\r\n`, 400, 'bad_request'],
  ['a request target over --max-url-length', `GET /echo/${'a'.repeat(3_000)} HTTP/1.1\r\n${HOST}\r\n`, 414, 'uri_too_long'],
  ['headers over --max-header-size', `GET /echo/a HTTP/1.1\r\n${HOST}X-Big: ${'b'.repeat(20_000)}\r\n\r\n`, 431, 'headers_too_large'],
  ['a Content-Length over --max-body-size', `POST /echo/a HTTP/1.1\r\n${HOST}Content-Length: 5000\r\n\r\n`, 413, 'body_too_large'],
  ['a chunked body over --max-body-size', `POST /echo/a HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\n${'400\r\n' + 'x'.repeat(1024) + '\r\n'}${'400\r\n' + 'x'.repeat(1024) + '\r\n'}0\r\n\r\n`, 413, 'body_too_large'],
]

for (const [name, bytes, status, code] of refused) {
  t.test(`${name}: ${status}, and nothing malformed reaches the upstream`, async (t) => {
    const before = upstream.seen.length
    const r = await raw(bytes)
    t.equal(r.status, status)
    if (code !== null) t.equal(JSON.parse(r.body).error, code)
    t.match(r.head.toLowerCase(), /connection: close/, 'the connection is closed after it')
    if (status !== 413 || !name.includes('chunked')) t.equal(upstream.seen.length, before, 'the upstream saw nothing')
    else t.ok(upstream.seen.every((s) => s.bodyBytes <= 1024), 'no complete oversized body reached the upstream')
  })
}

t.test('a body just under the limit and a clean path still pass', async (t) => {
  const r = await raw(`POST /echo/ok HTTP/1.1\r\n${HOST}Content-Length: 1000\r\nConnection: close\r\n\r\n${'y'.repeat(1000)}`)
  t.equal(r.status, 200)
  t.equal(JSON.parse(r.body).bodyBytes, 1000)
  t.equal((await send(`${proxy.url}/echo/a.b/c..d/%41?x=..`)).status, 200, 'dots inside names and queries are fine')
})

t.test('slowloris: headers sent too slowly get 408 and the connection closed', async (t) => {
  const socket = connect({ port: proxy.port, host: '127.0.0.1' })
  let got = ''
  socket.on('data', (c) => (got += c.toString('latin1')))
  const closed = new Promise<void>((r) => socket.on('close', () => r()))
  socket.on('error', () => {})
  socket.write('GET /echo/slow HTTP/1.1\r\nHost: x\r\n')
  const drip = setInterval(() => socket.writable && socket.write('X-Drip: 1\r\n'), 300)
  const startedAt = Date.now()
  // The headers timeout (1 s) plus the check interval (1 s) when the machine is not busy; the deadline is generous,
  // and a drip that kept the connection open would still never see it closed.
  const within = await Promise.race([closed.then(() => true), new Promise((r) => setTimeout(() => r(false), 15_000))])
  const closedMs = Date.now() - startedAt
  clearInterval(drip)
  socket.destroy()
  t.ok(within, `closed by the proxy within the headers timeout and the check interval (${within ? `after ${closedMs} ms` : 'not within 15 s'})`)
  t.equal(parseRaw(got).status, 408)
  t.equal(upstream.hits('/echo/slow'), 0)
})

t.test('seeded fuzz of request lines and headers: no worker crash, no 5xx but the framing refusals (501, 505)', async (t) => {
  let seed = 0x5eed
  const rand = (n: number): number => {
    seed = (seed * 1_103_515_245 + 12_345) & 0x7fffffff
    return seed % n
  }
  const pick = <T>(xs: readonly T[]): T => xs[rand(xs.length)]!
  const methods = ['GET', 'POST', 'PUT', 'HEAD', 'DELETE', 'OPTIONS', 'PATCH', 'G\x00T', 'get', '', 'TRACE', 'X'.repeat(40)]
  const targets = ['/echo/a', '/echo/a?b=c', '*', '//x', '/%', '/%00', '/echo/\x7f', 'http://x/', '/echo/' + 'z'.repeat(100), '/?%%', '/echo/a#frag']
  const versions = ['HTTP/1.1', 'HTTP/1.0', 'HTTP/2.0', 'HTTP/1.1x', 'HTTP/9', '']
  const names = ['Host', 'Content-Length', 'Transfer-Encoding', 'X-A', 'Connection', 'Expect', 'Upgrade', 'X-Forwarded-For', 'Te', 'Bad Name', ':path', '']
  const values = ['1', '0', '-1', 'chunked', 'close', '100-continue', 'h2c', 'a\x01b', 'x'.repeat(200), '', ' padded ', '1, 2', 'gzip, chunked', '\xff\xfe']
  const statuses: number[] = []
  for (let i = 0; i < 150; i++) {
    let req = `${pick(methods)} ${pick(targets)} ${pick(versions)}\r\n`
    const headerCount = rand(6)
    for (let h = 0; h < headerCount; h++) req += `${pick(names)}: ${pick(values)}\r\n`
    if (rand(3) > 0) req += HOST
    req += '\r\n'
    if (rand(4) === 0) req += 'body' + pick(values)
    // The proxy answers each and closes the connection (within milliseconds here): the deadline is for a busy machine,
    // where a cut-off exchange would read as no status at all.
    statuses.push(parseRaw(await rawExchange(proxy.port, req, 5_000)).status)
  }
  // 501 (a Transfer-Encoding other than chunked) and 505 (HTTP/2.0 as text) are refusals of the request, on purpose.
  const fivexx = statuses.filter((s) => s >= 500 && s !== 501 && s !== 505)
  t.same(fivexx, [], 'no other 5xx')
  t.ok(statuses.filter((s) => s >= 400 && s < 500).length > 50, 'most are refused with a 4xx')
  t.same(proxy.workerPids().sort(), pidsAtStart, 'the same workers are alive')
  t.equal(sumMetric((await admin(proxy, '/metrics')).text, 'meliproxy_worker_restarts_total'), 0)
  t.equal((await send(`${proxy.url}/echo/after-fuzz`)).status, 200, 'and still serving')
})

t.test('at --max-connections an idle keep-alive connection makes room for a new one; connections being answered do not', async (t) => {
  const own = await startUpstream()
  t.teardown(() => own.close())
  // 6 s: the four are still being answered when the newcomer comes, however slowly the steps before it ran.
  own.route('/slow', (_req, res) => setTimeout(() => res.end('slow'), 6_000))
  const capped = await startMeliproxy(['--upstream', own.url, '--max-connections', '4', '--no-cache'], { workers: 1 })
  t.teardown(() => capped.stop())
  /** A raw keep-alive connection that sends one request at once; `answered` once its response head arrived. */
  const open = (path: string) => {
    const c = rawClient(capped.port)
    c.s.write(`GET ${path} HTTP/1.1\r\n${HOST}\r\n`)
    return { s: c.s, answered: () => c.got().includes('\r\n\r\n') }
  }
  const metric = async (action: string) => sumMetric((await admin(capped, '/metrics')).text, 'meliproxy_connections_at_cap_total', new RegExp(`action="${action}"`))

  // Four connections, each answered and kept alive: the cap is full of idle connections.
  const idle = Array.from({ length: 4 }, (_, i) => open(`/echo/idle-${i}`))
  t.ok(await waitFor(() => idle.every((c) => c.answered()), 15_000), 'four keep-alive connections answered')
  await new Promise((r) => setTimeout(r, 1_500)) // idle for more than a second
  t.equal((await send(`${capped.url}/echo/newcomer`)).status, 200, 'a new connection is served')
  const closedIdle = () => idle.filter((c) => c.s.destroyed || c.s.readableEnded).length
  t.ok(await waitFor(() => closedIdle() === 1, 15_000), `exactly one idle connection was closed to make room (${closedIdle()} closed)`)
  t.equal(await metric('idle_closed'), 1)
  await closeAgents()
  for (const c of idle) c.s.destroy()

  // Four connections whose requests are being answered (a 6 s upstream): none is taken, the new one is closed.
  t.equal(await metric('refused'), 0, 'none refused so far')
  // The worker has closed its side of the five (a socket the client closed and the worker not yet is in CLOSE_WAIT).
  t.ok(await waitFor(() => serverSockets(capped.port) === 0, 15_000), `the worker closed the five (${serverSockets(capped.port)} left)`)
  const busy = Array.from({ length: 4 }, (_, i) => open(`/slow?${i}`))
  let inFlight = 0
  t.ok(await waitFor(async () => (inFlight = sumMetric((await admin(capped, '/metrics')).text, 'meliproxy_in_flight_requests')) === 4, 15_000), `four requests in flight (${inFlight})`)
  await new Promise((r) => setTimeout(r, 1_200)) // their requests began over a second ago
  // Closed at once: the client sees the connection end or reset, with nothing sent.
  const newcomer = await rawExchange(capped.port, `GET /echo/refused HTTP/1.1\r\n${HOST}\r\n`, 2_000).catch((err: Error) => err.message)
  t.match(newcomer, /^$|ECONNRESET|EPIPE/, 'the new connection is closed without an answer')
  let refusedCount = 0
  await waitFor(async () => (refusedCount = await metric('refused')) >= 1, 10_000)
  t.equal(refusedCount, 1, 'the new connection was refused')
  t.ok(await waitFor(() => busy.every((c) => c.answered()), 20_000), 'the four in flight are all answered')
  for (const c of busy) c.s.destroy()
})

/**
 * TCP connections whose local end is `port` on 127.0.0.1 and that a process still holds open (ESTABLISHED, or
 * CLOSE_WAIT: the peer closed and the owner has not yet), from /proc/net/tcp (Linux): the proxy's side of its
 * client connections.
 */
function serverSockets(port: number): number {
  const hex = port.toString(16).toUpperCase().padStart(4, '0')
  return readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1).filter((line) => {
    const [, local, , state] = line.trim().split(/\s+/)
    return local === `0100007F:${hex}` && (state === '01' || state === '08')
  }).length
}

t.test('at --max-connections a connection whose request is still arriving is not idle: the new one is refused, the request is answered', async (t) => {
  const capped = await startMeliproxy(['--upstream', upstream.url, '--max-connections', '3', '--no-cache', '--client-headers-timeout', '10s'], { workers: 1 })
  t.teardown(() => capped.stop())
  const metric = async (action: string) => sumMetric((await admin(capped, '/metrics')).text, 'meliproxy_connections_at_cap_total', new RegExp(`action="${action}"`))
  // One connection answered once and now sending its next request slowly; one new connection sending its first; one
  // that pipelined part of its second request with its first, answered since.
  const again = rawClient(capped.port)
  again.s.write(`GET /echo/first HTTP/1.1\r\n${HOST}\r\n`)
  t.ok(await waitFor(() => again.answers() === 1, 15_000), 'the first request answered')
  again.s.write('GET /echo/second HTTP/1.1\r\n')
  const fresh = rawClient(capped.port)
  fresh.s.write('GET /echo/fresh HTTP/1.1\r\n')
  const pipelined = rawClient(capped.port)
  pipelined.s.write(`GET /echo/p1 HTTP/1.1\r\n${HOST}\r\nGET /echo/p2 HTTP/1.1\r\n`)
  t.ok(await waitFor(() => pipelined.answers() === 1, 15_000), 'the pipelined first request answered')
  await new Promise((r) => setTimeout(r, 1_500)) // the three heads arriving for more than a second
  const newcomer = await rawExchange(capped.port, `GET /echo/newcomer HTTP/1.1\r\n${HOST}\r\n`, 2_000).catch((err: Error) => err.message)
  t.match(newcomer, /^$|ECONNRESET|EPIPE/, 'the new connection is closed without an answer')
  let refusedCount = 0
  await waitFor(async () => (refusedCount = await metric('refused')) >= 1, 10_000)
  t.equal(await metric('idle_closed'), 0, 'no connection taken as idle')
  t.equal(refusedCount, 1, 'the new connection was refused')
  for (const c of [again, fresh, pipelined]) c.s.write(`${HOST}\r\n`)
  t.ok(await waitFor(() => again.answers() === 2 && fresh.answers() === 1 && pipelined.answers() === 2, 15_000), 'the three slow requests answered')
  t.notOk(again.closed() || fresh.closed() || pipelined.closed(), 'no connection closed')
  for (const c of [again, fresh, pipelined]) c.s.destroy()
})

t.test('at --max-connections a connection whose long answer just ended is not idle: its client sends its next request on it', async (t) => {
  const own = await startUpstream()
  t.teardown(() => own.close())
  own.route('/slow', (_req, res) => setTimeout(() => res.end('slow'), 1_500))
  const capped = await startMeliproxy(['--upstream', own.url, '--max-connections', '1', '--no-cache'], { workers: 1 })
  t.teardown(() => capped.stop())
  const metric = async (action: string) => sumMetric((await admin(capped, '/metrics')).text, 'meliproxy_connections_at_cap_total', new RegExp(`action="${action}"`))
  const c = rawClient(capped.port)
  c.s.write(`GET /slow HTTP/1.1\r\n${HOST}\r\n`)
  t.ok(await waitFor(() => c.answers() === 1, 15_000), 'the 1.5 s request answered')
  // A new connection right after the answer, and the client's next request on its connection a moment later: its
  // request began over a second ago, but the connection has been idle for less than one.
  const newcomer = rawExchange(capped.port, `GET /echo/newcomer HTTP/1.1\r\n${HOST}\r\n`, 2_000).catch((err: Error) => err.message)
  await new Promise((r) => setTimeout(r, 300))
  c.s.write(`GET /echo/next HTTP/1.1\r\n${HOST}\r\n`)
  t.ok(await waitFor(() => c.answers() === 2 || c.closed(), 15_000), 'the next request answered or the connection closed')
  t.equal(c.answers(), 2, 'the next request on the connection is answered')
  t.match(await newcomer, /^$|ECONNRESET|EPIPE/, 'the new connection is closed without an answer')
  let refusedCount = 0
  await waitFor(async () => (refusedCount = await metric('refused')) >= 1, 10_000)
  t.equal(await metric('idle_closed'), 0, 'no connection taken as idle')
  t.equal(refusedCount, 1, 'the new connection was refused')
  c.s.destroy()
})

t.test('a flood of connections: past --max-connections a worker closes new ones, and serves again after', async (t) => {
  const capped = await startMeliproxy(['--upstream', upstream.url, '--max-connections', '20'], { workers: 1 })
  t.teardown(() => capped.stop())
  const sockets: Socket[] = []
  const results = await Promise.all(
    Array.from({ length: 60 }, () =>
      new Promise<'served' | 'closed'>((resolve) => {
        const s = connect({ port: capped.port, host: '127.0.0.1' })
        sockets.push(s)
        let got = ''
        s.on('data', (c) => {
          got += c.toString('latin1')
          if (got.includes('\r\n\r\n')) resolve('served')
        })
        s.on('error', () => resolve('closed'))
        s.on('close', () => resolve(got.includes('HTTP/1.1 200') ? 'served' : 'closed'))
        // Keep-alive requests: every served connection stays open, so the cap holds.
        s.on('connect', () => setTimeout(() => s.write('GET /echo/flood HTTP/1.1\r\nHost: x\r\n\r\n'), 200))
      }),
    ),
  )
  const served = results.filter((r) => r === 'served').length
  t.ok(served <= 20, `${served} served of 60 connections (cap 20)`)
  t.ok(served >= 15, 'the cap still lets the allowed ones through')
  for (const s of sockets) s.destroy()
  // Until the worker has seen the flood's sockets close, a new connection may still be over the cap and reset.
  const servesAgain = await waitFor(() => send(`${capped.url}/echo/after`).then((r) => r.status === 200, () => false), 15_000)
  t.ok(servesAgain, 'serves again once they are gone')
})
