import t from 'tap'
import { deltaSeconds, initialAgeMs, parseCacheControl, parseHttpDate, requestDirectives, responsePolicy, type StoreRules } from '../../src/cache/policy.js'

/** The cache policy (src/cache/policy.ts) alone: what may be stored, for how long, and how dates and ages are read. */

const RULES: StoreRules = { defaultTtlMs: null, targetedFields: ['cdn-cache-control'] }
const NOW = Date.UTC(2026, 0, 1, 12, 0, 0)
const policy = (status: number, headers: Record<string, string>, req: Record<string, string> = {}, rules = RULES) =>
  responsePolicy(status, headers, req, rules, NOW)

t.test('HTTP-dates: only the three RFC 9110 forms are valid', async (t) => {
  const at = Date.UTC(1994, 10, 6, 8, 49, 37)
  t.equal(parseHttpDate('Sun, 06 Nov 1994 08:49:37 GMT'), at, 'IMF-fixdate')
  t.equal(parseHttpDate('Sunday, 06-Nov-94 08:49:37 GMT'), at, 'RFC 850')
  t.equal(parseHttpDate('Sun Nov  6 08:49:37 1994'), at, 'asctime')
  for (const bad of [
    'Thu, 18 Aug 2050 02:01:18 UTC',
    'Sun 06 Nov 1994 08:49:37 GMT',
    'Sun,  06 Nov 1994 08:49:37 GMT',
    'Sun, 06-Nov-1994 08:49:37 GMT',
    'Sun, 06 Nov 1994 8:49:37 GMT',
    'Sun, 06 Nov 1994\r\n 08:49:37 GMT',
    '1994-11-06T08:49:37Z',
    '',
  ]) t.equal(parseHttpDate(bad), null, `invalid: ${JSON.stringify(bad)}`)
})

t.test('Cache-Control parsing: arguments, quotes, duplicates', async (t) => {
  const cc = parseCacheControl('max-age=60, no-cache="set-cookie", Public')
  t.equal(cc.get('max-age'), '60')
  t.equal(cc.get('public'), true, 'names are case-insensitive')
  t.ok(cc.has('no-cache'))
  t.equal(deltaSeconds('60'), 60)
  t.equal(deltaSeconds('-1'), null, 'a negative delta is invalid')
  t.equal(deltaSeconds(true), null, 'max-age without a value is invalid')
})

t.test('freshness: s-maxage over max-age over Expires; invalid Expires is stale', async (t) => {
  t.equal(policy(200, { 'cache-control': 'max-age=60, s-maxage=5' }).freshnessMs, 5_000, 's-maxage wins for a shared cache')
  t.equal(policy(200, { 'cache-control': 'max-age=60' }).freshnessMs, 60_000)
  const date = 'Thu, 01 Jan 2026 12:00:00 GMT'
  t.equal(policy(200, { date, expires: 'Thu, 01 Jan 2026 12:00:30 GMT' }).freshnessMs, 30_000, 'Expires minus Date')
  const bad = policy(200, { date, expires: 'Thu, 18 Aug 2050 02:01:18 UTC' })
  t.equal(bad.notStorable, null, 'stored')
  t.equal(bad.freshnessMs, 0, 'but already stale')
  t.equal(policy(200, { 'cache-control': 'max-age=60, no-cache' }).freshnessMs, 0, 'no-cache: revalidate every time')
})

t.test('what a shared cache must not store', async (t) => {
  t.equal(policy(200, { 'cache-control': 'no-store, max-age=60' }).notStorable, 'no-store')
  t.equal(policy(200, { 'cache-control': 'private, max-age=60' }).notStorable, 'private')
  t.equal(policy(200, { 'cache-control': 'max-age=60', 'set-cookie': 'a=1' }).notStorable, 'set-cookie')
  t.equal(policy(200, { 'cache-control': 'max-age=60', vary: '*' }).notStorable, 'vary: *')
  t.equal(policy(206, { 'cache-control': 'max-age=60' }).notStorable, 'status 206')
  t.equal(policy(200, { 'cache-control': 'max-age=60' }, { authorization: 'Bearer x' }).notStorable, 'request had Authorization')
  t.equal(policy(200, { 'cache-control': 'public, max-age=60' }, { authorization: 'Bearer x' }).notStorable, null, 'unless public')
  t.equal(policy(200, {}).notStorable, 'no freshness information', 'no heuristic freshness without a default TTL')
  t.equal(policy(200, {}, {}, { ...RULES, defaultTtlMs: 7_000 }).freshnessMs, 7_000, 'the default TTL for a cacheable status')
  t.equal(policy(201, {}, {}, { ...RULES, defaultTtlMs: 7_000 }).notStorable, 'no freshness information', 'but not for 201')
})

t.test('targeted fields (RFC 9213) replace Cache-Control, most specific first', async (t) => {
  t.equal(policy(200, { 'cache-control': 'max-age=600', 'cdn-cache-control': 'no-store' }).notStorable, 'no-store')
  t.equal(policy(200, { 'cache-control': 'no-store', 'cdn-cache-control': 'max-age=9' }).freshnessMs, 9_000)
  const own: StoreRules = { defaultTtlMs: null, targetedFields: ['meliproxy-cache-control', 'cdn-cache-control'] }
  const h = { 'cache-control': 'max-age=1', 'cdn-cache-control': 'max-age=2', 'meliproxy-cache-control': 'max-age=3' }
  t.equal(policy(200, h, {}, own).freshnessMs, 3_000, "the operator's field first")
})

t.test('stale-while-revalidate and stale-if-error, not with must-revalidate', async (t) => {
  const p = policy(200, { 'cache-control': 'max-age=1, stale-while-revalidate=5, stale-if-error=9' })
  t.same([p.swrMs, p.sieMs], [5_000, 9_000])
  const m = policy(200, { 'cache-control': 'max-age=1, must-revalidate, stale-while-revalidate=5, stale-if-error=9' })
  t.same([m.swrMs, m.sieMs], [0, 0])
})

t.test('initial age: the larger of apparent age and Age plus the request time', async (t) => {
  const date = new Date(NOW - 10_000).toUTCString()
  t.equal(initialAgeMs({ date }, NOW - 200, NOW), 10_000, 'apparent age')
  t.equal(initialAgeMs({ date, age: '30' }, NOW - 200, NOW), 30_200, 'Age + response delay')
  t.equal(initialAgeMs({ age: 'abc' }, NOW - 200, NOW), 200, 'an invalid Age is ignored')
})

t.test("the client's directives", async (t) => {
  t.match(requestDirectives({ 'cache-control': 'no-store' }), { noStore: true, noCache: false })
  t.match(requestDirectives({ 'cache-control': 'max-age=0' }), { noStore: false, noCache: true, maxAgeMs: 0 })
  t.match(requestDirectives({ pragma: 'no-cache' }), { noStore: false, noCache: true })
  t.same(requestDirectives({}), { noStore: false, noCache: false, maxAgeMs: null, minFreshMs: 0, onlyIfCached: false })
  t.match(requestDirectives({ 'cache-control': 'max-age=5, min-fresh=2, only-if-cached' }), { maxAgeMs: 5_000, minFreshMs: 2_000, onlyIfCached: true })
})
