import t from 'tap'
import { ConfigError } from '../../src/errors.js'
import { RuleSet, type RequestFacts } from '../../src/limiter/rules.js'
import { parseRules } from '../../src/limiter/spec.js'
import type { RuleSpec } from '../../src/limiter/types.js'

/**
 * Rule specs (src/limiter/spec.ts) and their compiled matchers (kept per `match` object): a spec that crossed IPC or
 * came from Redis (a copy: no matchers kept for it) selects the same requests as the one parsed here, and a spec
 * with a bad CIDR or glob is refused naming the field, in the order the fields are written.
 */

const RAW = [
  { name: 'ips', limit: 5, window: '1m', match: { ip: ['10.0.0.0/8', '2001:db8::/32'] } },
  { name: 'paths', limit: 5, window: '1m', match: { path: ['/items/*', '/a/**'], method: ['get', 'POST'] } },
  { name: 'keys', limit: 5, window: '1m', match: { header: { 'X-Api-Key': 'k-*' } }, mode: 'shadow' },
]

const FACTS: RequestFacts[] = [
  { ip: '10.1.2.3', method: 'GET', path: '/items/1', headers: {} },
  { ip: '192.0.2.1', method: 'POST', path: '/a/b/c', headers: { 'x-api-key': 'k-1' } },
  { ip: '2001:db8::5', method: 'DELETE', path: '/items/1/x', headers: { 'x-api-key': 'other' } },
  { ip: '192.0.2.1', method: 'GET', path: '/other', headers: {} },
]

function selected(set: RuleSet, f: RequestFacts): string[] {
  return [...set.bucketsFor(f), ...set.shadowBucketsFor(f)].map((b) => b.rule.name)
}

t.test('a copied spec (IPC, Redis) selects the same requests as the parsed one', async (t) => {
  const parsed = parseRules(RAW)
  const copied = JSON.parse(JSON.stringify(parsed)) as RuleSpec[]
  const a = new RuleSet(parsed, [], [])
  const b = new RuleSet(copied, [], [])
  const c = a.withGenerations({ ips: 2 })
  for (const f of FACTS) {
    t.same(selected(b, f), selected(a, f), `${f.ip} ${f.method} ${f.path}`)
    t.same(selected(c, f), selected(a, f), `after a reset: ${f.ip} ${f.method} ${f.path}`)
  }
  t.same(selected(a, FACTS[0]!), ['ips', 'paths'])
  t.same(selected(a, FACTS[1]!), ['paths', 'keys'])
  t.same(selected(a, FACTS[2]!), ['ips'])
  t.same(selected(a, FACTS[3]!), [])
})

t.test('a copied spec with a bad CIDR is refused naming the field, not compiled into a matcher that throws later', async (t) => {
  const bad = { ...parseRules(RAW)[0]!, match: { ip: ['10.0.0.0/33'] } }
  t.throws(() => new RuleSet([bad], [], []), ConfigError)
})

function fieldOf(raw: unknown): string {
  try {
    parseRules([raw])
  } catch (err) {
    if (err instanceof ConfigError) return err.field
    throw err
  }
  return ''
}

t.test('errors name the first bad field as written: match (ip, path, method, header) before per', async (t) => {
  t.match(fieldOf({ name: 'r', limit: 1, window: '1m', match: { ip: 'nope' }, per: ['nope'] }), /\.match\.ip$/)
  t.match(fieldOf({ name: 'r', limit: 1, window: '1m', match: { path: 'no-slash' }, per: ['nope'] }), /\.match\.path$/)
  t.match(fieldOf({ name: 'r', limit: 1, window: '1m', match: { ip: 'nope', method: 'get me' } }), /\.match\.ip$/)
  t.match(fieldOf({ name: 'r', limit: 1, window: '1m', match: { path: 'no-slash', header: { 'bad name': 'x' } } }), /\.match\.path$/)
  t.match(fieldOf({ name: 'r', limit: 1, window: '1m', per: ['nope'] }), /\.per$/)
})
