import t from 'tap'
import { Registry } from 'prom-client'
import { LocalPool, MemoryPool } from '../../src/limiter/pool.js'
import { Limiter } from '../../src/limiter/limiter.js'
import { LimiterMetrics } from '../../src/limiter/metrics.js'
import { parseRules, RuleSet } from '../../src/limiter/rules.js'
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
