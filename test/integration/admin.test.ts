import t from 'tap'
import { closeAgents, send } from '../helpers/client.js'
import { adminCall, runBinary, startMeliproxy, startTogether, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

const TOKEN = 's3cret-admin-token'
let upstream: TestUpstream
let redis: RedisProcess
let a: RunningProxy
let b: RunningProxy

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/items', (req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=600' })
    res.end(`item ${req.url}`)
  })
  redis = await startRedis()
  const args = ['--upstream', upstream.url, '--redis-url', `redis://127.0.0.1:${redis.port}`, '--admin-token', TOKEN]
  ;[a, b] = await startTogether([args, args])
})
t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()])
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

function purge(p: RunningProxy, path: string | null, token?: string): Promise<{ status: number; body: any }> {
  return adminCall(p, 'DELETE', `/api/cache${path === null ? '' : `?path=${encodeURIComponent(path)}`}`, { token })
}

t.test('DELETE /api/cache without a valid token is 401 with a JSON code, and purges nothing', async (t) => {
  await send(`${a.url}/items/keep`)
  const none = await purge(a, '/items/**')
  t.equal(none.status, 401)
  t.equal(none.body.error, 'unauthorized')
  const wrong = await purge(a, '/items/**', 'not-the-token')
  t.equal(wrong.status, 401)
  t.equal((await send(`${a.url}/items/keep`)).headers['x-cache'], 'HIT', 'still cached')
})

t.test('a bad glob is 400 naming the problem', async (t) => {
  const r = await purge(a, 'items/*', TOKEN)
  t.equal(r.status, 400)
  t.match(r.body.message, /must start with \//)
  const missing = await purge(a, null, TOKEN)
  t.equal(missing.status, 400)
})

t.test('a purge by glob removes the URLs from L2 and from L1 of every worker of both instances', async (t) => {
  const urls = ['/items/1', '/items/2', '/items/3?x=1']
  for (const u of urls) {
    await send(`${a.url}${u}`)
    for (let i = 0; i < 4; i++) await send(`${b.url}${u}`, { from: `127.0.0.${70 + i}` }) // warm B's workers' L1
  }
  await send(`${a.url}/other-kept`)
  const before = upstream.seen.length
  const r = await purge(b, '/items/*', TOKEN)
  t.equal(r.status, 200)
  t.equal(r.body.removedFromL2, 4, 'the three URLs and /items/keep from the test before')
  for (const u of urls) {
    for (const p of [a, b]) {
      const got = await send(`${p.url}${u}`, { from: '127.0.0.80' })
      t.equal(got.status, 200)
    }
  }
  t.equal(upstream.seen.length - before, 3, 'each purged URL went upstream once more, then was shared again')
})

t.test('the admin API is never reachable on the proxy port', async (t) => {
  const before = upstream.seen.length
  const r = await send(`${a.url}/api/cache?path=/items/**`, { method: 'DELETE', headers: { authorization: `Bearer ${TOKEN}` } })
  t.not(r.body.includes('removedFromL2'), true, 'the proxy port forwarded it instead')
  t.equal(upstream.seen.length, before + 1, 'the request went to the upstream')
})

t.test('an admin listener on a non-loopback address without a token refuses to start', async (t) => {
  const r = await runBinary(['--admin-host', '0.0.0.0'])
  t.equal(r.code, 2)
  t.match(r.stderr, /--admin-host: "0\.0\.0\.0" is not a loopback address/)
})

t.test('every mutating admin call needs the token; tokens and Authorization headers never reach the logs', async (t) => {
  const chatty = await startMeliproxy(['--upstream', upstream.url, '--admin-token', TOKEN, '--log-level', 'debug'])
  t.teardown(() => chatty.stop())
  const mutating: [string, string, unknown][] = [
    ['PUT', '/api/limits', { limits: [] }],
    ['POST', '/api/limits/rollback', { version: 0 }],
    ['POST', '/api/limits/reset', { rule: 'x' }],
    ['DELETE', '/api/cache?path=/items/**', undefined],
  ]
  for (const [method, path, body] of mutating) {
    t.equal((await adminCall(chatty, method, path, { body })).status, 401, `${method} ${path} without a token`)
    const wrong = await adminCall(chatty, method, path, { body, token: 'wrong-token-in-a-log-would-leak' })
    t.equal(wrong.status, 401, `${method} ${path} with a wrong token`)
    t.equal(wrong.body.error, 'unauthorized')
  }
  t.equal((await adminCall(chatty, 'PUT', '/api/limits', { body: { limits: [] }, token: TOKEN })).status, 200, 'the right token works')
  await send(`${chatty.url}/items/secret`, { headers: { authorization: 'Bearer client-credential-xyz', cookie: 'session=abc' } })
  await send(`${chatty.url}/items/secret?x=1`, { headers: { authorization: 'Basic dXNlcjpwYXNzd29yZA==' } })
  // The access log is written in batches: both lines are waited for (a busy machine writes them later).
  const logged = () => chatty.stdout.filter((l) => l.includes('/items/secret')).length
  t.ok(await waitFor(() => logged() >= 2, 15_000), `both requests reached the access log (${logged()} lines)`)
  const logs = chatty.stdout.concat(chatty.stderr).join('\n')
  t.match(logs, /\/items\/secret/, 'the requests were logged')
  for (const secret of [TOKEN, 'wrong-token-in-a-log-would-leak', 'client-credential-xyz', 'dXNlcjpwYXNzd29yZA==', 'session=abc']) {
    t.notOk(logs.includes(secret), `${secret.slice(0, 12)}... is not in the logs`)
  }
  const noToken = await startMeliproxy(['--upstream', upstream.url])
  t.teardown(() => noToken.stop())
  const unset = await adminCall(noToken, 'PUT', '/api/limits', { body: { limits: [] }, token: 'anything' })
  t.equal(unset.status, 403, 'without a configured token nothing may mutate')
  t.equal(unset.body.error, 'admin_token_unset')
})
