import t from 'tap'
import { request } from 'undici'
import { closeAgents, send } from '../helpers/client.js'
import { runBinary, startMeliproxy, type RunningProxy } from '../helpers/meliproxy.js'
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
  ;[a, b] = await Promise.all([startMeliproxy(args), startMeliproxy(args)])
})
t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()])
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

async function purge(p: RunningProxy, path: string | null, token?: string): Promise<{ status: number; body: any }> {
  const res = await request(`${p.adminUrl}/api/cache${path === null ? '' : `?path=${encodeURIComponent(path)}`}`, {
    method: 'DELETE',
    headers: token === undefined ? {} : { authorization: `Bearer ${token}` },
  })
  return { status: res.statusCode, body: await res.body.json() }
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
