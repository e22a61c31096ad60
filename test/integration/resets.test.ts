import t from 'tap'
import type { Redis } from 'ioredis'
import { awayFromWindowEdge, closeAgents, send } from '../helpers/client.js'
import { admin, adminCall, startMeliproxy, startTogether, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { startRedis, type RedisProcess } from '../helpers/redis.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * Resets and rule changes reach every instance (src/limiter/rules-controller.ts), with two real instances (two
 * workers each) on a real Redis: a reset of a rule is one step (its next generation; nothing scanned or deleted), a
 * reset of one bucket is one DEL, and an instance whose subscriber could not hear a change picks it up anyway (on
 * reconnect, and by the periodic re-sync). Without Redis the same resets work inside one instance.
 */

const TOKEN = 'resets-test-token'
const HOUR = 3_600_000
/** RESYNC_MS of the rules controller, and generous room for a busy machine (how long it took is reported). */
const RESYNC_DEADLINE_MS = 5_000 + 20_000
const RULE = { name: 'items-ip', match: { path: '/items/*' }, per: ['ip'], limit: 3, window: '1h' }

let upstream: TestUpstream
let redis: RedisProcess
let r: Redis
let a: RunningProxy
let b: RunningProxy

t.before(async () => {
  upstream = await startUpstream()
  upstream.route('/items', (_req, res) => {
    res.writeHead(200, { 'cache-control': 'no-store' })
    res.end('{}')
  })
  redis = await startRedis()
  r = redis.client()
  const args = ['--upstream', upstream.url, '--redis-url', `redis://127.0.0.1:${redis.port}`, '--admin-token', TOKEN,
    '--config', writeConfig({ limits: [RULE] })]
  ;[a, b] = await startTogether([args, args])
})
t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()])
  await redis?.stop()
  await closeAgents()
  await upstream?.close()
})

async function statuses(p: RunningProxy, from: string, n: number): Promise<number[]> {
  const out: number[] = []
  for (let i = 0; i < n; i++) out.push((await send(`${p.url}/items/x${i}`, { from })).status)
  return out
}

/** SCANs since the last CONFIG RESETSTAT. */
async function scans(): Promise<number> {
  const text = (await r.info('commandstats')) as string
  return Number(/^cmdstat_scan:calls=(\d+)/m.exec(text)?.[1] ?? 0)
}

/** A key this file deletes itself after `during`, so its notification comes after every one before it. */
const MARKER = 'resets-test:marker'

/** Every key deleted while `during` runs (Redis keyspace notifications), and what `during` returned. */
async function deletedBy<T>(during: () => Promise<T>): Promise<{ deleted: string[]; result: T }> {
  const sub = redis.client()
  const deleted: string[] = []
  await r.config('SET', 'notify-keyspace-events', 'Eg')
  await sub.subscribe('__keyevent@0__:del')
  sub.on('message', (_channel: string, key: string) => deleted.push(key))
  try {
    const result = await during()
    await new Promise((res) => setTimeout(res, 200)) // a moment for any deletion made after the answer
    // Redis publishes notifications in the order it runs the commands: once the marker's arrives, every deletion made
    // before it has arrived too, however slow the machine (a fixed wait alone could miss one).
    await r.set(MARKER, '1')
    await r.del(MARKER)
    if (!(await waitFor(() => deleted.includes(MARKER), 15_000))) throw new Error(`the marker's notification did not come; seen: ${deleted.join(', ')}`)
    return { deleted: deleted.filter((k) => k !== MARKER), result }
  } finally {
    sub.disconnect()
  }
}

/**
 * Keeps every subscriber connection of the Redis closed (CLIENT KILL TYPE pubsub, over and over) while `during` runs
 * and a moment after, so what is announced meanwhile reaches no instance through the channels.
 */
async function deaf<T>(during: () => Promise<T>): Promise<T> {
  let stop = false
  const killer = (async () => {
    while (!stop) {
      await r.call('CLIENT', 'KILL', 'TYPE', 'pubsub')
      await new Promise((res) => setImmediate(res))
    }
  })()
  try {
    const result = await during()
    await new Promise((res) => setTimeout(res, 300)) // past any message still on its way
    return result
  } finally {
    stop = true
    await killer
  }
}

t.test('a reset of one bucket is one DEL of its key, and reaches every instance', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  t.same(await statuses(a, '127.0.0.31', 4), [200, 200, 200, 429])
  t.same(await statuses(b, '127.0.0.32', 4), [200, 200, 200, 429])
  await r.config('RESETSTAT')
  const { deleted, result: one } = await deletedBy(() =>
    adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip', key: '127.0.0.31' }, token: TOKEN }))
  t.same(one.body, { rule: 'items-ip', key: '127.0.0.31', generation: 0, cleared: 1 })
  t.same(deleted, ['mp:rl:items-ip|127.0.0.31'], 'one key deleted: that bucket')
  t.equal(await scans(), 0, 'no SCAN')
  t.same(await statuses(b, '127.0.0.31', 1), [200], 'that client passes again on the other instance')
  t.same(await statuses(b, '127.0.0.32', 1), [429], 'the other client is still limited')
  const wrong = await adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip', key: '' }, token: TOKEN })
  t.equal(wrong.status, 400)
  t.equal(wrong.body.field, 'key')
})

t.test('a reset of a rule is one generation step for the fleet: nothing scanned or deleted', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  t.same(await statuses(a, '127.0.0.33', 4), [200, 200, 200, 429])
  t.same(await statuses(b, '127.0.0.34', 4), [200, 200, 200, 429])
  const before = await r.keys('mp:rl:items-ip*')
  await r.config('RESETSTAT')
  const { deleted, result: all } = await deletedBy(() => adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip' }, token: TOKEN }))
  t.equal(all.status, 200)
  t.same(all.body, { rule: 'items-ip', key: null, generation: 1 })
  t.equal(await scans(), 0, 'no SCAN')
  t.same(deleted, [], 'no key deleted')
  t.equal(await r.hget('mp:limits:generations', 'items-ip'), '1', 'the rule is at generation 1')
  t.same(await statuses(a, '127.0.0.33', 1), [200], 'the reset instance counts afresh at once')
  // Over pub/sub, within milliseconds when the machine is not busy: how long is reported, not asserted.
  const resetAt = Date.now()
  t.ok(await waitFor(async () => (await statuses(b, '127.0.0.34', 1))[0] === 200, 15_000), `and the other soon after (${Date.now() - resetAt} ms)`)
  t.same(await statuses(b, '127.0.0.33', 3), [200, 200, 429], 'one count for the fleet again: 1 on A, 2 on B, then full')
  t.ok(before.every((k) => k.startsWith('mp:rl:items-ip|')), 'the old buckets were generation 0')
  t.same((await r.keys('mp:rl:items-ip*')).filter((k) => !before.includes(k)).sort(), ['mp:rl:items-ip~1|127.0.0.33', 'mp:rl:items-ip~1|127.0.0.34'],
    'the new counts live under generation 1; the old keys are left to expire')
  const one = await adminCall(b, 'POST', '/api/limits/reset', { body: { rule: 'items-ip', key: '127.0.0.33' }, token: TOKEN })
  t.same(one.body, { rule: 'items-ip', key: '127.0.0.33', generation: 1, cleared: 1 }, "a bucket's reset finds the key of the current generation")
})

t.test('a reset no subscriber heard is in force on every instance within the re-sync period', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  t.same(await statuses(b, '127.0.0.35', 4), [200, 200, 200, 429])
  const lines = b.stderr.length
  const all = await deaf(() => adminCall(a, 'POST', '/api/limits/reset', { body: { rule: 'items-ip' }, token: TOKEN }))
  t.same(all.body, { rule: 'items-ip', key: null, generation: 2 })
  t.ok(await waitFor(async () => (await statuses(b, '127.0.0.35', 1))[0] === 200, RESYNC_DEADLINE_MS), 'B counts the client afresh')
  t.ok(await waitFor(() => b.stderr.slice(lines).some((l) => l.includes('rule generations read from the store')), 10_000),
    'B learnt it by reading, not from the channel')
})

t.test('a generation stored with no announcement at all is picked up by the periodic re-sync', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  t.same(await statuses(a, '127.0.0.36', 4), [200, 200, 200, 429])
  t.same(await statuses(b, '127.0.0.36', 1), [429])
  await r.hincrby('mp:limits:generations', 'items-ip', 1)
  const started = Date.now()
  // A refused request takes nothing, so asking until one is admitted counts one on each instance.
  t.ok(await waitFor(async () => (await statuses(a, '127.0.0.36', 1))[0] === 200, RESYNC_DEADLINE_MS), `A counts afresh (${Date.now() - started} ms)`)
  t.ok(await waitFor(async () => (await statuses(b, '127.0.0.36', 1))[0] === 200, RESYNC_DEADLINE_MS), `B counts afresh (${Date.now() - started} ms)`)
  t.same(await statuses(b, '127.0.0.36', 2), [200, 429], 'under one shared count')
})

t.test('a rule change stored while the other instance cannot hear is enforced there anyway', async (t) => {
  await awayFromWindowEdge(HOUR, 30_000)
  const put = await deaf(() => adminCall(a, 'PUT', '/api/limits', { body: { limits: [{ ...RULE, name: 'items-ip-2', limit: 2 }] }, token: TOKEN }))
  t.equal(put.status, 200)
  const started = Date.now()
  t.ok(await waitFor(async () => (await admin(b, '/api/limits')).body.version === put.body.version, RESYNC_DEADLINE_MS),
    `B has the new version (${Date.now() - started} ms)`)
  t.same(await statuses(b, '127.0.0.38', 3), [200, 200, 429], 'and its workers enforce it')
  t.same(await statuses(a, '127.0.0.38', 1), [429], 'on the count A shares')
})

t.test('without Redis a reset works the same inside the instance', async (t) => {
  const solo = await startMeliproxy(['--upstream', upstream.url, '--admin-token', TOKEN, '--config', writeConfig({ limits: [RULE] })])
  t.teardown(() => solo.stop())
  await awayFromWindowEdge(HOUR, 30_000)
  t.same(await statuses(solo, '127.0.0.41', 4), [200, 200, 200, 429])
  t.same(await statuses(solo, '127.0.0.42', 4), [200, 200, 200, 429])
  const one = await adminCall(solo, 'POST', '/api/limits/reset', { body: { rule: 'items-ip', key: '127.0.0.41' }, token: TOKEN })
  t.same(one.body, { rule: 'items-ip', key: '127.0.0.41', generation: 0, cleared: 1 })
  t.same(await statuses(solo, '127.0.0.41', 4), [200, 200, 200, 429], 'that bucket starts empty, on both workers')
  t.same(await statuses(solo, '127.0.0.42', 1), [429], 'the other does not')
  const all = await adminCall(solo, 'POST', '/api/limits/reset', { body: { rule: 'items-ip' }, token: TOKEN })
  t.same(all.body, { rule: 'items-ip', key: null, generation: 1 })
  t.same(await statuses(solo, '127.0.0.42', 4), [200, 200, 200, 429], 'every bucket of the rule starts empty')
})

t.test('per: ip counts an IPv6 client by its network; --limit-ipv6-prefix sets how wide', async (t) => {
  const solo = await startMeliproxy(['--upstream', upstream.url, '--trust-proxy', '127.0.0.1', '--limit-ipv6-prefix', '48',
    '--config', writeConfig({ limits: [{ ...RULE, limit: 2 }] })])
  t.teardown(() => solo.stop())
  await awayFromWindowEdge(HOUR, 30_000)
  const via = async (xff: string): Promise<number> => (await send(`${solo.url}/items/v6`, { headers: { 'x-forwarded-for': xff } })).status
  t.equal(await via('2001:db8:1:1::1'), 200)
  t.equal(await via('2001:db8:1:2::1'), 200, 'another /64 of the same /48')
  t.equal(await via('2001:db8:1:ffff::abcd'), 429, 'the /48 is one client')
  t.equal(await via('2001:db8:2::1'), 200, 'the next /48 is another')
  t.equal(await via('198.51.100.7'), 200)
  t.equal(await via('198.51.100.8'), 200, 'IPv4 clients are each their own')
})
