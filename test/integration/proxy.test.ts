import { createHash, randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import t from 'tap'
import { Agent, request } from 'undici'
import { startMeliproxy, type RunningProxy } from '../helpers/meliproxy.js'
import { parseRaw, rawExchange } from '../helpers/raw.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

let upstream: TestUpstream
let proxy: RunningProxy
const agent = new Agent({ keepAliveTimeout: 1_000 })

t.before(async () => {
  upstream = await startUpstream()
  // Short enough for the /hang test, long enough that a busy machine does not turn an ordinary answer (the 5 MB
  // echo's, say) into a 504.
  proxy = await startMeliproxy(['--upstream', upstream.url, '--headers-timeout', '2s'])
})
t.teardown(async () => {
  await proxy?.stop()
  await upstream?.close()
  await agent.close()
})

t.test('every method reaches the upstream with its path, query and body, and the answer comes back', async (t) => {
  for (const method of ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const) {
    const body = method === 'GET' || method === 'OPTIONS' ? undefined : `payload for ${method}`
    const res = await request(`${proxy.url}/echo/m?x=1&x=2&y=%20z`, { method, body, dispatcher: agent })
    t.equal(res.statusCode, 200, `${method} status`)
    const seen = (await res.body.json()) as { method: string; url: string; bodyBytes: number }
    t.equal(seen.method, method, `${method} method seen upstream`)
    t.equal(seen.url, '/echo/m?x=1&x=2&y=%20z', `${method} path and query untouched`)
    t.equal(seen.bodyBytes, body ? Buffer.byteLength(body) : 0, `${method} body length`)
  }
  const head = await request(`${proxy.url}/echo/head`, { method: 'HEAD', dispatcher: agent })
  t.equal(head.statusCode, 200)
  t.equal(await head.body.text(), '', 'HEAD has no body')
})

t.test('a 5 MB body round-trips byte for byte in both directions', async (t) => {
  const big = randomBytes(5 * 1024 * 1024)
  const res = await request(`${proxy.url}/echo/big?raw=1`, { method: 'POST', body: big, dispatcher: agent })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['x-body-sha256'], sha256(big), 'upstream received the exact bytes')
  const back = Buffer.from(await res.body.arrayBuffer())
  t.equal(back.length, big.length)
  t.equal(sha256(back), sha256(big), 'client received the exact bytes')
})

t.test('a chunked upload with no content-length is streamed through', async (t) => {
  const parts = [randomBytes(70_000), randomBytes(1), randomBytes(300_000)]
  const res = await request(`${proxy.url}/echo/chunked`, {
    method: 'PUT',
    body: Readable.from(parts),
    dispatcher: agent,
  })
  const seen = (await res.body.json()) as { headers: Record<string, string>; bodySha256: string; bodyBytes: number }
  t.equal(seen.headers['transfer-encoding'], 'chunked', 'the upstream saw a chunked body')
  t.equal(seen.bodyBytes, 370_001)
  t.equal(seen.bodySha256, sha256(Buffer.concat(parts)))
})

t.test('repeated request headers arrive upstream in order; forwarding headers are set', async (t) => {
  const res = await request(`${proxy.url}/echo/h`, {
    headers: [
      'x-multi', 'first',
      'x-multi', 'second',
      'x-forwarded-for', '203.0.113.9',
      'x-forwarded-host', 'spoofed.example',
    ],
    dispatcher: agent,
  })
  const seen = (await res.body.json()) as { rawHeaders: string[]; headers: Record<string, string> }
  const multi = seen.rawHeaders.filter((_, i) => i % 2 === 1 && seen.rawHeaders[i - 1]!.toLowerCase() === 'x-multi')
  t.same(multi, ['first', 'second'])
  t.equal(seen.headers.host, `127.0.0.1:${upstream.port}`, 'Host is the upstream')
  t.equal(seen.headers['x-forwarded-for'], '203.0.113.9, 127.0.0.1', 'the peer is appended to X-Forwarded-For')
  t.equal(seen.headers['x-forwarded-proto'], 'http')
  t.equal(seen.headers['x-forwarded-host'], `127.0.0.1:${proxy.port}`, 'an untrusted peer cannot set X-Forwarded-Host')
  t.equal(seen.headers.via, '1.1 meliproxy')
})

t.test('hop-by-hop request headers, and those Connection names, are not forwarded', async (t) => {
  const text = await rawExchange(
    proxy.port,
    'GET /echo/hop HTTP/1.1\r\nHost: x\r\nConnection: close, x-private-hop\r\nX-Private-Hop: secret\r\n' +
      'Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-End-To-End: kept\r\n\r\n',
  )
  const { status, body } = parseRaw(text)
  t.equal(status, 200)
  const seen = JSON.parse(body) as { headers: Record<string, string> }
  for (const h of ['x-private-hop', 'keep-alive', 'te', 'proxy-connection']) {
    t.equal(seen.headers[h], undefined, `${h} dropped`)
  }
  t.not(seen.headers.connection, 'close, x-private-hop', 'the client connection header is not passed on')
  t.equal(seen.headers['x-end-to-end'], 'kept')
})

t.test('hop-by-hop response headers are dropped; repeated response headers and Set-Cookie are kept', async (t) => {
  const res = await request(`${proxy.url}/hop`, { dispatcher: agent })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['x-hop-named'], undefined, 'a header named by Connection is dropped')
  t.equal(res.headers['proxy-connection'], undefined)
  t.not(res.headers['keep-alive'], 'timeout=1', "the upstream's Keep-Alive is not relayed")
  t.same(res.headers['set-cookie'], ['a=1; Path=/', 'b=2; Path=/'])
  t.match(String(res.headers['x-multi']), /one.*two/)
  t.equal(res.headers.via, '1.1 meliproxy')
  t.equal(await res.body.text(), 'hop')
})

t.test('a 3xx goes back to the client as is, never followed', async (t) => {
  const before = upstream.hits('/echo/target')
  const res = await request(`${proxy.url}/redirect`, { dispatcher: agent, maxRedirections: 0 } as never)
  t.equal(res.statusCode, 302)
  t.equal(res.headers.location, '/echo/target')
  t.equal(await res.body.text(), 'moved')
  t.equal(upstream.hits('/echo/target'), before, 'the proxy did not follow the redirect')
})

t.test('an upstream 404 passes through untouched', async (t) => {
  const res = await request(`${proxy.url}/nothing/here`, { dispatcher: agent })
  t.equal(res.statusCode, 404)
  t.equal(await res.body.text(), 'no such test route')
})

t.test('an upstream that does not answer in time gives 504 with a JSON error', async (t) => {
  const res = await request(`${proxy.url}/hang`, { dispatcher: agent })
  t.equal(res.statusCode, 504)
  t.equal(res.headers['content-type'], 'application/json')
  const body = (await res.body.json()) as { error: string; message: string }
  t.equal(body.error, 'upstream_timeout')
  t.type(body.message, 'string')
})

t.test('an unreachable upstream gives 502 with a JSON error', async (t) => {
  const dead = await startUpstream()
  await dead.close()
  const p = await startMeliproxy(['--upstream', dead.url])
  t.teardown(() => p.stop())
  const res = await request(`${p.url}/anything`, { dispatcher: agent })
  t.equal(res.statusCode, 502)
  const body = (await res.body.json()) as { error: string }
  t.equal(body.error, 'upstream_unreachable')
})

t.test('a client that disconnects aborts its upstream request', async (t) => {
  let closedUpstream = false
  upstream.route('/abort-me', (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain' })
    res.write('partial')
    res.on('close', () => (closedUpstream = true))
  })
  const ac = new AbortController()
  const res = await request(`${proxy.url}/abort-me`, { dispatcher: agent, signal: ac.signal })
  t.equal(res.statusCode, 200)
  ac.abort()
  await res.body.text().catch(() => undefined)
  const abortedAt = Date.now()
  // A generous deadline: the worker notices the client's close and aborts on its next turn, later on a busy machine.
  const deadline = abortedAt + 15_000
  while (!closedUpstream && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
  t.ok(closedUpstream, `the upstream connection was closed after the client left (${closedUpstream ? `${Date.now() - abortedAt} ms after` : 'not within 15 s'})`)
})
