import { createHash, randomBytes } from 'node:crypto'
import { connect, type Socket } from 'node:net'
import t from 'tap'
import { request } from 'undici'
import { closeAgents, send } from '../helpers/client.js'
import { sumMetric } from '../helpers/load.js'
import { admin, startMeliproxy, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { parseRaw, rawExchange } from '../helpers/raw.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * At the edge, as nginx is (real binary, real upstream, raw sockets): request bodies up to --request-buffering are
 * read whole before the upstream hears of the request, so slow clients tie up nothing upstream; larger bodies stream,
 * ended with 408 below --request-body-min-rate; Transfer-Encoding and the HTTP version are read strictly and refusals
 * never reach the upstream; header names with `_` are dropped by default; every access-log line carries the status
 * the client received (0 with a reason when nothing was sent).
 */

let upstream: TestUpstream
let proxy: RunningProxy

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/cacheable', (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60' })
    res.end('cached body')
  })
  proxy = await startMeliproxy([
    '--upstream', upstream.url, '--request-buffering', '16kb',
    '--client-headers-timeout', '1s', '--client-request-timeout', '3s',
  ])
})
t.teardown(async () => {
  await proxy?.stop()
  await closeAgents()
  await upstream?.close()
})

const H = 'Host: x\r\n'

/** The access-log lines the proxy wrote so far, parsed. */
function accessLines(p: RunningProxy = proxy): { path: string; status: number; reason?: string; ip: string; method: string }[] {
  return p.stdout.filter((l) => l.startsWith('{"time"')).map((l) => JSON.parse(l))
}

async function metrics(p: RunningProxy = proxy): Promise<string> {
  return (await admin(p, '/metrics')).text
}

/** A raw client that sends `head` at once, then one byte of body a second until the proxy closes or `maxMs` pass. */
function dripClient(port: number, head: string, maxMs: number): { done: Promise<string>; socket: Socket } {
  const socket = connect({ port, host: '127.0.0.1' })
  let got = ''
  socket.on('data', (c: Buffer) => (got += c.toString('latin1')))
  socket.on('error', () => {})
  socket.write(head)
  const drip = setInterval(() => socket.writable && socket.write('x'), 1_000)
  const done = new Promise<string>((resolve) => {
    const stop = setTimeout(() => socket.destroy(), maxMs)
    socket.on('close', () => {
      clearInterval(drip)
      clearTimeout(stop)
      resolve(got)
    })
  })
  return { done, socket }
}

t.test('slow bodies up to --request-buffering never reach the upstream: no request, no connection; 408 at the request timeout', async (t) => {
  const own = await startUpstream()
  t.teardown(() => own.close())
  const p = await startMeliproxy(['--upstream', own.url, '--client-headers-timeout', '1s', '--client-request-timeout', '3s'])
  t.teardown(() => p.stop())
  const N = 30
  const clients = Array.from({ length: N }, (_, i) => dripClient(p.port, `POST /echo/drip-${i} HTTP/1.1\r\n${H}Content-Length: 40\r\n\r\n`, 30_000))
  // Meanwhile a GET is answered, and the upstream has no connection but the probe's (one per worker at most).
  await new Promise((r) => setTimeout(r, 1_500))
  const probeStarted = performance.now()
  const probe = await send(`${p.url}/echo/probe`)
  t.comment(`probe GET answered in ${(performance.now() - probeStarted).toFixed(1)} ms while ${N} bodies dripped`)
  t.equal(probe.status, 200, 'a GET meanwhile is answered')
  t.equal(own.seen.filter((s) => s.url.startsWith('/echo/drip')).length, 0, 'the upstream saw none of the slow requests')
  t.ok(own.openConnections() <= 2, `upstream connections while ${N} bodies drip: ${own.openConnections()} (the probe's)`)
  const answers = await Promise.all(clients.map((c) => c.done))
  const statuses = answers.map((a) => parseRaw(a).status)
  t.same(statuses, Array(N).fill(408), 'every slow client got 408')
  t.equal(JSON.parse(parseRaw(answers[0]!).body).error, 'request_timeout')
  t.equal(own.seen.filter((s) => s.url.startsWith('/echo/drip')).length, 0, 'and the upstream never heard of them')
  t.ok(own.openConnections() <= 2, 'nor held a connection for them')
  const m = await metrics(p)
  t.equal(sumMetric(m, 'meliproxy_slow_request_bodies_total', /mode="buffered"/), N, 'counted as slow buffered bodies')
  // The access log is written in batches (later on a busy machine): generous deadlines for its lines in this file.
  const logged408 = () => accessLines(p).filter((l) => l.path.startsWith('/echo/drip') && l.status === 408).length
  t.ok(await waitFor(() => logged408() === N, 15_000), `each logged with the 408 it got (${logged408()} of ${N})`)
})

t.test('a 5 MB upload streams through; a small one, chunked, is buffered and sent with its length', async (t) => {
  const body = randomBytes(5 * 1024 * 1024)
  const res = await request(`${proxy.url}/echo/upload`, { method: 'POST', body, headers: { 'content-type': 'application/octet-stream' } })
  const echoed = (await res.body.json()) as { bodyBytes: number; bodySha256: string }
  t.equal(res.statusCode, 200)
  t.equal(echoed.bodyBytes, body.length)
  t.equal(echoed.bodySha256, createHash('sha256').update(body).digest('hex'), 'the same bytes')

  const r = parseRaw(await rawExchange(proxy.port, `POST /echo/small HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n`))
  t.equal(r.status, 200)
  const seen = upstream.seen.find((s) => s.url === '/echo/small')!
  t.equal(seen.bodyBytes, 11)
  t.equal(seen.headers['content-length'], '11', 'read whole, then sent with its length')
  t.equal(seen.headers['transfer-encoding'], undefined)
  const m = await metrics()
  t.ok(sumMetric(m, 'meliproxy_request_bodies_total', /mode="streamed"/) >= 1, 'the upload streamed')
  t.ok(sumMetric(m, 'meliproxy_request_bodies_total', /mode="buffered"/) >= 1, 'the small body was buffered')
})

t.test('a chunked body larger than the buffer streams on after what was read', async (t) => {
  const chunk = 'z'.repeat(10_000)
  const chunks = Array.from({ length: 4 }, () => `${(10_000).toString(16)}\r\n${chunk}\r\n`).join('')
  const r = parseRaw(await rawExchange(proxy.port, `POST /echo/bigchunked HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n${chunks}0\r\n\r\n`))
  t.equal(r.status, 200)
  t.equal(JSON.parse(r.body).bodyBytes, 40_000)
})

t.test('a streamed body slower than --request-body-min-rate: 408, and the upstream request is aborted', async (t) => {
  const own = await startUpstream()
  t.teardown(() => own.close())
  const p = await startMeliproxy(['--upstream', own.url, '--request-buffering', '1kb', '--request-body-min-rate', '1kb', '--client-request-timeout', '60s'], { workers: 1 })
  t.teardown(() => p.stop())
  const c = dripClient(p.port, `POST /echo/trickle HTTP/1.1\r\n${H}Content-Length: 100000\r\n\r\n${'a'.repeat(4_000)}`, 20_000)
  t.ok(await waitFor(() => own.openConnections() === 1, 15_000), 'the body streams upstream')
  const got = parseRaw(await c.done)
  t.equal(got.status, 408)
  t.equal(JSON.parse(got.body).error, 'request_timeout')
  t.ok(await waitFor(() => own.openConnections() === 0, 15_000), 'the upstream request was aborted (its connection closed)')
  t.equal(own.hits('/echo/trickle'), 0, 'no complete request reached the upstream')
  const m = await metrics(p)
  t.equal(sumMetric(m, 'meliproxy_slow_request_bodies_total', /mode="streamed"/), 1)
  t.equal(sumMetric(m, 'meliproxy_refused_requests_total'), 0, 'it went upstream: not a refusal')
})

const framing: [string, string, number, string | null][] = [
  ['Transfer-Encoding: cunked, then Transfer-Encoding: chunked', `POST /echo/te1 HTTP/1.1\r\n${H}Transfer-Encoding: cunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 501, 'unknown_transfer_coding'],
  ['Transfer-Encoding: ,chunked', `POST /echo/te2 HTTP/1.1\r\n${H}Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n`, 400, 'bad_request'],
  ['Transfer-Encoding: gzip, chunked', `POST /echo/te3 HTTP/1.1\r\n${H}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n`, 501, 'unknown_transfer_coding'],
  ['Transfer-Encoding: chunked, chunked', `POST /echo/te4 HTTP/1.1\r\n${H}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n`, 400, 'bad_request'],
  ['Transfer-Encoding: chunked with an empty line of it', `POST /echo/te5 HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n0\r\n\r\n`, 400, null],
  ['HTTP/0.9 (no version)', `GET /echo/v09\r\n${H}\r\n`, 400, 'bad_request'],
  ['HTTP/0.9 without headers', `GET /echo/v09b\r\n\r\n`, 400, 'bad_request'],
  ['HTTP/2.0 as a text request line', `GET /echo/v20 HTTP/2.0\r\n${H}\r\n`, 505, 'http_version_not_supported'],
  ['HTTP/1.2', `GET /echo/v12 HTTP/1.1\r\n${H}\r\n`.replace('HTTP/1.1', 'HTTP/1.2'), 400, 'bad_request'],
  // RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing (nginx: 400); nor is the request pipelined after it served
  [
    'Transfer-Encoding: chunked in an HTTP/1.0 request, keep-alive, a request pipelined after it',
    `POST /echo/te10 HTTP/1.0\r\n${H}Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo/te10-after HTTP/1.0\r\n${H}\r\n`,
    400,
    'bad_request',
  ],
]

for (const [name, bytes, status, code] of framing) {
  t.test(`${name}: ${status}, never forwarded`, async (t) => {
    const before = upstream.seen.length
    // Answered and closed at once: the deadline only matters on a busy machine.
    const r = parseRaw(await rawExchange(proxy.port, bytes, 15_000))
    t.equal(r.status, status)
    if (code !== null) t.equal(JSON.parse(r.body).error, code)
    t.match(r.head.toLowerCase(), /connection: close/, 'the connection is closed after it')
    await new Promise((res) => setTimeout(res, 100))
    t.equal(upstream.seen.length, before, 'the upstream saw nothing')
  })
}

t.test('a bare HTTP/0.9 line (`GET /` and nothing more) is never forwarded: 408 when the headers time out', async (t) => {
  const before = upstream.seen.length
  const r = parseRaw(await rawExchange(proxy.port, 'GET /echo/v09-bare\r\n', 15_000))
  t.equal(r.status, 408)
  t.equal(upstream.seen.length, before, 'the upstream saw nothing')
})

t.test('a GET with a bad chunk is refused before a cached answer is written', async (t) => {
  t.equal((await send(`${proxy.url}/cacheable`)).status, 200)
  t.ok(await waitFor(async () => (await send(`${proxy.url}/cacheable`)).headers['x-cache'] === 'HIT', 15_000), 'cached')
  const text = await rawExchange(proxy.port, `GET /cacheable HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n`, 15_000)
  t.match(text, /^HTTP\/1\.1 400 /, 'the first (and only) answer is the 400')
  t.equal(text.match(/HTTP\/1\.1 /g)?.length, 1, 'no cached 200 before it')
})

t.test('a bad chunk in a request pipelined behind a slow one: the slow answer first, then the 400, then the close', async (t) => {
  const from = '127.0.0.94'
  const text = await rawExchange(
    proxy.port,
    `GET /slow?ms=400 HTTP/1.1\r\n${H}\r\nPOST /echo/queued-bad HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n`,
    15_000,
    from,
  )
  t.same([...text.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1])), [200, 400], 'in order')
  t.match(text, /slow done/, 'the slow answer whole')
  t.equal(upstream.hits('/echo/queued-bad'), 0)
  t.ok(await waitFor(() => accessLines().some((l) => l.path === '/echo/queued-bad' && l.status === 400), 15_000), 'logged with the 400 it got')
})

t.test('header names with "_" are dropped by default: not forwarded, not the body framing', async (t) => {
  const r = parseRaw(await rawExchange(proxy.port, `POST /echo/us HTTP/1.1\r\n${H}Transfer_Encoding: chunked\r\nX_Api_Key: k\r\nX-Kept: 1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello`))
  t.equal(r.status, 200)
  const seen = upstream.seen.find((s) => s.url === '/echo/us')!
  const names = seen.rawHeaders.filter((_, i) => i % 2 === 0).map((n) => n.toLowerCase())
  t.notOk(names.some((n) => n.includes('_')), 'no underscored name reached the upstream')
  t.ok(names.includes('x-kept'))
  t.equal(seen.bodyBytes, 5, 'the body framed by Content-Length')
})

t.test('the access log: one line per answer with the status the client got; nothing sent is status 0 with a reason', async (t) => {
  const from = '127.0.0.91'
  const text = await rawExchange(proxy.port, `GET /echo/log1 HTTP/1.1\r\n${H}\r\nGET /echo/log2 HTTP/1.1\r\n\r\n\x01junk\r\n\r\n`, 15_000, from)
  const got = [...text.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1]))
  t.same(got, [200, 400], 'the client got 200 then 400 (and the close)')
  t.ok(await waitFor(() => accessLines().filter((l) => l.ip === from).length >= 3, 15_000), `three lines logged (${accessLines().filter((l) => l.ip === from).length})`)
  await new Promise((r) => setTimeout(r, 200))
  const lines = accessLines().filter((l) => l.ip === from)
  t.same(lines.filter((l) => l.status !== 0).map((l) => [l.path, l.status]), [['/echo/log1', 200], ['/echo/log2', 400]], 'the statuses the client got')
  t.same(lines.filter((l) => l.status === 0).map((l) => l.reason), ['parse_error_unsent'], 'the junk: nothing sent')
})

t.test('a client that closes in the middle of its request: status 0, client_closed, not a refusal', async (t) => {
  const refusedBefore = sumMetric(await metrics(), 'meliproxy_refused_requests_total')
  // Half a buffered body, then the client ends its side.
  const from = '127.0.0.92'
  const half = connect({ port: proxy.port, host: '127.0.0.1', localAddress: from })
  half.on('error', () => {})
  half.write(`POST /echo/half HTTP/1.1\r\n${H}Content-Length: 100\r\n\r\nabc`)
  setTimeout(() => half.end(), 200)
  // Part of a streamed body (it went upstream), then the client goes.
  const streamed = connect({ port: proxy.port, host: '127.0.0.1', localAddress: from })
  streamed.on('error', () => {})
  streamed.write(`POST /echo/gone HTTP/1.1\r\n${H}Content-Length: 200000\r\n\r\n${'b'.repeat(30_000)}`)
  setTimeout(() => streamed.destroy(), 500)
  t.ok(
    await waitFor(() => ['/echo/half', '/echo/gone'].every((p) => accessLines().some((l) => l.path === p)), 15_000),
    'both logged',
  )
  for (const path of ['/echo/half', '/echo/gone']) {
    const line = accessLines().find((l) => l.path === path)!
    t.equal(line.status, 0, `${path}: nothing sent`)
    t.equal(line.reason, 'client_closed', `${path}: the client closed`)
  }
  half.destroy()
  t.equal(upstream.hits('/echo/half'), 0, 'the half-sent buffered body never reached the upstream')
  t.equal(sumMetric(await metrics(), 'meliproxy_refused_requests_total'), refusedBefore, 'neither counted as a refusal')
})

t.test('a body refused once read (over --max-body-size): one answer, one line; a request pipelined after it is not served', async (t) => {
  const own = await startUpstream()
  t.teardown(() => own.close())
  const p = await startMeliproxy(['--upstream', own.url, '--max-body-size', '100', '--client-headers-timeout', '1s', '--client-request-timeout', '3s'], { workers: 1 })
  t.teardown(() => p.stop())
  // The whole chunked body (over the limit) and the next request arrive in one write: the parser reads the next
  // request before the 413 is decided.
  const big = `96\r\n${'a'.repeat(150)}\r\n0\r\n\r\n`
  const text = await rawExchange(p.port, `POST /echo/over HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n${big}GET /echo/after-413 HTTP/1.1\r\n${H}\r\n`, 15_000)
  t.same([...text.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1])), [413], 'the 413, then the close')
  t.ok(await waitFor(() => accessLines(p).some((l) => l.path === '/echo/after-413'), 15_000), 'the pipelined request is logged')
  t.equal(accessLines(p).find((l) => l.path === '/echo/after-413')!.reason, 'after_close', 'the pipelined request was dropped, not served')
  t.equal(own.hits('/echo/after-413'), 0)
  // A coding refused before its body was read: the body's bytes the parser then refuses are no request of their own.
  const r = parseRaw(await rawExchange(p.port, `POST /echo/gz HTTP/1.1\r\n${H}Transfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n`, 15_000))
  t.equal(r.status, 501)
  t.ok(await waitFor(() => accessLines(p).some((l) => l.path === '/echo/gz'), 15_000), 'the refused coding is logged')
  await new Promise((res) => setTimeout(res, 300)) // a moment for any line that should not be there
  t.same(
    accessLines(p).map((l) => [l.path, l.status, l.reason]),
    [['/echo/over', 413, 'body_too_large'], ['/echo/after-413', 0, 'after_close'], ['/echo/gz', 501, 'unknown_transfer_coding']],
    'one line per request, with what the client got',
  )
  const m = await metrics(p)
  t.equal(sumMetric(m, 'meliproxy_refused_requests_total'), 3, 'each counted once')
  t.equal(sumMetric(m, 'meliproxy_request_bodies_total'), 0, 'no body went on')
})

t.test('an idle keep-alive connection stays open for --client-keepalive-timeout (75 s by default), then closes', async (t) => {
  // The default, announced on every kept-alive answer: longer than the usual load balancer's idle timeout (60 s).
  // Kept alive, so read until the answer is in (a fixed time could end before it on a busy machine).
  const first = connect({ port: proxy.port, host: '127.0.0.1' })
  first.on('error', () => {})
  let firstGot = ''
  first.on('data', (c: Buffer) => (firstGot += c.toString('latin1')))
  first.write(`GET /cacheable HTTP/1.1\r\n${H}\r\n`)
  await waitFor(() => firstGot.includes('cached body'), 15_000)
  first.destroy()
  const announced = parseRaw(firstGot)
  t.match(announced.head, /\r\nKeep-Alive: timeout=75\r\n/i, 'the default is announced')

  const p = await startMeliproxy(['--upstream', upstream.url, '--client-keepalive-timeout', '3s', '--client-headers-timeout', '1s'], { workers: 1 })
  t.teardown(() => p.stop())
  const socket = connect({ port: p.port, host: '127.0.0.1' })
  socket.on('error', () => {})
  let got = ''
  let lastData = 0
  socket.on('data', (c: Buffer) => {
    got += c.toString('latin1')
    lastData = Date.now()
  })
  const closed = new Promise<number>((resolve) => socket.on('close', () => resolve(Date.now())))
  socket.write(`GET /cacheable HTTP/1.1\r\n${H}\r\n`)
  t.ok(await waitFor(() => got.includes('cached body'), 15_000), 'answered')
  const idleFrom = lastData
  t.match(got, /\r\nKeep-Alive: timeout=3\r\n/i, 'the configured timeout is announced')
  // Past the 1 s headers timeout: an idle connection is not a slow request.
  // When it closed, not whether it is open at a moment: a test delayed past the 3 s timeout would see it closed.
  const closedAt = await Promise.race([closed, new Promise<null>((r) => setTimeout(() => r(null), 15_000))])
  t.ok(closedAt === null || closedAt - idleFrom >= 2_000, `still open after 2 s idle (closed ${closedAt === null ? 'not at all' : `after ${closedAt - idleFrom} ms`})`)
  t.ok(closedAt !== null, 'closed by the proxy once idle past the timeout')
  t.comment(`idle connection closed after ${closedAt === null ? 'more than 15,000' : closedAt - idleFrom} ms (timeout 3 s)`)
  socket.destroy()
})
