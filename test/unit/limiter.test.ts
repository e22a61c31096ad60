import t from 'tap'
import { Registry } from 'prom-client'
import { LocalPool, MemoryPool } from '../../src/limiter/pool.js'
import { Limiter } from '../../src/limiter/limiter.js'
import { LimiterMetrics } from '../../src/limiter/metrics.js'
import { parseRuleSetDoc } from '../../src/limiter/rule-store.js'
import { RuleSet } from '../../src/limiter/rules.js'
import { parseRules } from '../../src/limiter/spec.js'
import { createLogger } from '../../src/log.js'

const quiet = createLogger('error', { write: () => true }, {})
const facts = (ip: string, path: string) => ({ ip, method: 'GET', path, headers: {} })

function limiter(rules: unknown): Limiter {
  return new Limiter(
    new RuleSet(parseRules(rules), [], []),
    { redis: null, primary: new LocalPool(new MemoryPool()), instances: 1, workers: 1 },
    new LimiterMetrics(new Registry()),
    quiet,
  )
}

t.test('a request is admitted only if every matching rule has room; a rejected one takes nothing', async (t) => {
  const l = limiter([
    { name: 'ip', match: { ip: '10.0.0.1' }, limit: 3, window: '1h' },
    { name: 'ip-items', match: { ip: '10.0.0.1', path: '/items/*' }, limit: 1, window: '1h' },
  ])
  t.equal((await l.check(facts('10.0.0.1', '/items/1')))!.allowed, true)
  const second = (await l.check(facts('10.0.0.1', '/items/2')))!
  t.equal(second.allowed, false)
  t.equal(second.rule.name, 'ip-items')
  t.equal((await l.check(facts('10.0.0.1', '/a')))!.allowed, true, 'the rejection took nothing from "ip"')
  t.equal((await l.check(facts('10.0.0.1', '/b')))!.allowed, true)
  const fourth = (await l.check(facts('10.0.0.1', '/c')))!
  t.equal(fourth.allowed, false)
  t.equal(fourth.rule.name, 'ip')
  t.equal(l.check(facts('10.0.0.2', '/items/1')), null, 'no rule governs another client')
})

t.test('the verdict names the rule nearest exhaustion', async (t) => {
  const l = limiter([
    { name: 'wide', limit: 100, window: '1m' },
    { name: 'narrow', match: { path: '/x' }, limit: 2, window: '1m' },
  ])
  const v = (await l.check(facts('10.0.0.1', '/x')))!
  t.equal(v.rule.name, 'narrow')
  t.equal(v.remaining, 1)
  t.ok(v.resetMs > 0 && v.resetMs <= 60_000)
})

t.test('replaceRules swaps the rule set; counters of a kept name carry on', async (t) => {
  const l = limiter([{ name: 'all', limit: 2, window: '1h' }])
  await l.check(facts('10.0.0.1', '/'))
  await l.check(facts('10.0.0.1', '/'))
  t.equal((await l.check(facts('10.0.0.1', '/')))!.allowed, false)
  l.replaceRules(new RuleSet(parseRules([{ name: 'all', limit: 3, window: '1h' }]), [], []))
  t.equal((await l.check(facts('10.0.0.1', '/')))!.allowed, true, 'the third fits under the new limit')
  t.equal((await l.check(facts('10.0.0.1', '/')))!.allowed, false)
})

t.test('the rule features validate every field with one line naming it', async (t) => {
  const bad: [unknown, RegExp][] = [
    [{ algorithm: 'leaky' }, /\.algorithm: "leaky" is not one of fixed, sliding, token-bucket/],
    [{ burst: 5 }, /\.burst: is only for algorithm: token-bucket/],
    [{ algorithm: 'token-bucket', burst: 0 }, /\.burst: 0 is not a whole number above 0/],
    [{ mode: 'dry-run' }, /\.mode: "dry-run" is not one of enforce, shadow/],
    [{ cost: 0 }, /\.cost: 0 is not a whole number above 0/],
    [{ cost: 11 }, /\.cost: 11 is above the limit 10/],
    [{ algorithm: 'token-bucket', burst: 3, cost: 4 }, /\.cost: 4 is above the burst 3/],
    [{ cost: { header: 'x-cost' } }, /\.cost\.max: is required/],
    [{ cost: { header: 'bad header', max: 3 } }, /\.cost\.header: "bad header" is not a header name/],
    [{ cost: { header: 'x-cost', max: 3, min: 1 } }, /\.cost\.min: unknown field/],
    [{ onExceed: 'queue' }, /\.onExceed: "queue" is not one of reject, delay/],
    [{ maxDelay: '3s' }, /\.maxDelay: is only for onExceed: delay/],
    [{ onExceed: 'delay', maxDelay: '2m' }, /\.maxDelay: "2m" is out of range \(1ms to 60s\)/],
    [{ onExceed: 'delay', mode: 'shadow' }, /\.onExceed: a shadow rule never holds a request/],
    [{ whenRedisDown: 'fail' }, /\.whenRedisDown: "fail" is not one of local, allow, deny/],
  ]
  for (const [extra, message] of bad) {
    t.throws(() => parseRules([{ name: 'r', limit: 10, window: '1m', ...(extra as object) }]), message, JSON.stringify(extra))
  }
  const [d] = parseRules([{ name: 'd', limit: 10, window: '1m' }])
  t.match(d, { algorithm: 'fixed', burst: 10, mode: 'enforce', cost: 1, onExceed: 'reject', maxDelay: null, whenRedisDown: 'local' }, 'the defaults')
  const [x] = parseRules([{ name: 'x', limit: 10, window: '1m', algorithm: 'token-bucket', burst: 5, onExceed: 'delay', maxDelay: '500ms' }])
  t.match(x, { burst: 5, onExceed: 'delay', maxDelay: '500ms', maxDelayMs: 500 })
})

t.test('a header cost: missing is 1, above max is max, garbage is max', async (t) => {
  const rules = new RuleSet(parseRules([{ name: 'x', limit: 100, window: '1m', cost: { header: 'X-Cost', max: 20 } }]), [], [])
  const cost = (headers: Record<string, string>) => rules.bucketsFor({ ip: '127.0.0.1', method: 'GET', path: '/', headers })[0]!.cost
  t.equal(cost({}), 1)
  t.equal(cost({ 'x-cost': '7' }), 7)
  t.equal(cost({ 'x-cost': '0' }), 1, 'never below 1')
  t.equal(cost({ 'x-cost': '999' }), 20)
  t.equal(cost({ 'x-cost': '-3' }), 20)
  t.equal(cost({ 'x-cost': 'lots' }), 20)
})

t.test('shadow rules are kept apart from the enforced ones', async (t) => {
  const rules = new RuleSet(parseRules([{ name: 'e', limit: 5, window: '1m' }, { name: 's', limit: 1, window: '1m', mode: 'shadow' }]), [], [])
  const facts = { ip: '127.0.0.1', method: 'GET', path: '/', headers: {} }
  t.same(rules.bucketsFor(facts).map((b) => b.rule.name), ['e'])
  t.same(rules.shadowBucketsFor(facts).map((b) => b.rule.name), ['s'])
})

t.test('a rule set with the new fields reads back as it was written (admin API, stored versions)', async (t) => {
  const limits = [
    { name: 's', match: { path: ['/users/*'] }, algorithm: 'sliding', limit: 5, window: '10s' },
    { name: 't', algorithm: 'token-bucket', limit: 10, window: '1m', burst: 5, onExceed: 'delay', maxDelay: '3s' },
    { name: 'h', limit: 1, window: '1h', mode: 'shadow' },
    { name: 'c', limit: 10, window: '1h', cost: { header: 'x-cost', max: 10 }, whenRedisDown: 'deny' },
    { name: 'plain', limit: 3, window: '1m' },
  ]
  t.same(parseRuleSetDoc({ limits }).doc.limits, limits)
})
