import fc from 'fast-check'
import t from 'tap'
import { bucketKeyOf, CompiledRule, generationOf, rulePrefix, RuleSet, type RequestFacts } from '../../src/limiter/rules.js'
import { parseRules } from '../../src/limiter/spec.js'

/**
 * Bucket keys (src/limiter/rules.ts): bounded whatever the client sends, never shared by two buckets, the same from a
 * request and from the admin API's reset, and all of a rule's under one computable prefix (its generation included).
 */

const rule = (r: Record<string, unknown>, generation = 0, ipv6Prefix = 64): CompiledRule =>
  new CompiledRule(parseRules([{ name: 'r', limit: 10, window: '1m', ...r }])[0]!, generation, ipv6Prefix)
const facts = (ip: string, headers: Record<string, string | string[]> = {}, path = '/items/1'): RequestFacts => ({ ip, method: 'GET', path, headers })
/** The hashed form: prefix, `|#`, 43 base64url characters of SHA-256. */
const HASHED = /^r\|#[A-Za-z0-9_-]{43}$/

t.test('short, plain values stay readable: rule name then each per value', async (t) => {
  t.equal(rule({}).bucketKey(facts('10.0.0.1')), 'r', 'no per: the rule name')
  t.equal(rule({ per: ['ip'] }).bucketKey(facts('10.0.0.1')), 'r|10.0.0.1')
  t.equal(rule({ per: ['ip', 'method', 'path'] }).bucketKey(facts('10.0.0.1')), 'r|10.0.0.1|GET|/items/1')
  t.equal(rule({ per: ['header:x-api-key'] }).bucketKey(facts('10.0.0.1')), 'r|', 'a missing header is the empty value')
  t.equal(rule({ per: ['header:x-api-key'] }).bucketKey(facts('10.0.0.1', { 'x-api-key': 'k'.repeat(64) })), `r|${'k'.repeat(64)}`, '64 characters stay raw')
})

t.test('a long, odd or separator-holding value is hashed: keys of fixed size', async (t) => {
  const perKey = rule({ per: ['header:x-api-key'] })
  const key = (v: string): string => perKey.bucketKey(facts('10.0.0.1', { 'x-api-key': v }))
  t.match(key('k'.repeat(65)), HASHED, '65 characters')
  t.match(key('k'.repeat(8192)), HASHED, 'an 8 KB value makes a 48-character key')
  for (const v of ['a|b', 'a#b', 'a b', 'a*', 'a?', 'a[b]', 'a\\b', '{tag}', 'caf\u00e9', 'a\u0000', 'a\u007f']) {
    t.match(key(v), HASHED, `${JSON.stringify(v)} is hashed`)
  }
  t.equal(key('k'.repeat(8192)), key('k'.repeat(8192)), 'the same value, the same key')
  t.not(key('k'.repeat(8192)), key('k'.repeat(8191) + 'j'), 'a different long value, another key')
})

t.test("a '|' in a value never makes two buckets collide", async (t) => {
  const two = rule({ per: ['header:a', 'header:b'] })
  const k1 = two.bucketKey(facts('10.0.0.1', { a: 'x|y', b: 'z' }))
  const k2 = two.bucketKey(facts('10.0.0.1', { a: 'x', b: 'y|z' }))
  const k3 = two.bucketKey(facts('10.0.0.1', { a: 'x|y|z', b: '' }))
  t.equal(new Set([k1, k2, k3]).size, 3, 'the three splits of x|y|z are three buckets')
  t.not(rule({ per: ['header:a'] }).bucketKey(facts('10.0.0.1', { a: 'x|y' })), two.bucketKey(facts('10.0.0.1', { a: 'x', b: 'y' })),
    'one value holding | is not the two values it looks like')
  t.not(two.bucketKey(facts('10.0.0.1', { a: '#', b: '' })), two.bucketKey(facts('10.0.0.1', { a: '', b: '#' })))
})

t.test('two different value lists never have the same key (raw, hashed, or one of each)', async (t) => {
  // Values drawn to hit both forms: separators, marks, long runs, the empty value.
  const value = fc.oneof(
    fc.string({ maxLength: 6 }),
    fc.constantFrom('', '|', '#', '|#', 'a|b', '#a', 'a', 'b', 'a'.repeat(64), 'a'.repeat(65)),
    fc.string({ unit: fc.constantFrom('a', '|', '#', '\u00e9'), maxLength: 8 }),
  )
  const list = fc.array(value, { maxLength: 3 })
  fc.assert(
    fc.property(list, list, (a, b) => {
      const same = a.length === b.length && a.every((v, i) => v === b[i])
      return (bucketKeyOf('r', a) === bucketKeyOf('r', b)) === same
    }),
    { numRuns: 5_000 },
  )
  // The same seen exhaustively over a small alphabet: every list of up to 3 values of up to 2 characters.
  const chars = ['', 'a', '|', '#']
  const values = new Set<string>()
  for (const x of chars) for (const y of chars) values.add(x + y)
  const lists: string[][] = [[]]
  for (let n = 0; n < 3; n++) for (const l of [...lists]) if (l.length === n) for (const v of values) lists.push([...l, v])
  const seen = new Map<string, string>()
  let collisions = 0
  for (const l of lists) {
    const k = bucketKeyOf('r', l)
    const was = seen.get(k)
    if (was !== undefined && was !== JSON.stringify(l)) collisions++
    seen.set(k, JSON.stringify(l))
  }
  t.equal(collisions, 0, `${lists.length} lists, as many keys`)
})

t.test("every key of a rule is its prefix, or the prefix and '|': a generation is a separate prefix", async (t) => {
  t.equal(rulePrefix('api', 0), 'api')
  t.equal(rulePrefix('api', 3), 'api~3')
  const keys = (generation: number): string[] => {
    const r = rule({ per: ['header:k'] }, generation)
    return ['', 'a', 'a|b', 'x'.repeat(100), '#'].map((v) => r.bucketKey(facts('10.0.0.1', { k: v })))
  }
  for (const g of [0, 1, 12]) {
    const prefix = rulePrefix('r', g)
    for (const k of keys(g)) t.ok(k === prefix || k.startsWith(prefix + '|'), `${k} is under ${prefix}`)
  }
  const g0 = new Set(keys(0))
  t.notOk(keys(1).some((k) => g0.has(k)), 'no key of generation 1 is a key of generation 0')
  t.notOk(keys(1).some((k) => k.startsWith('r|') || k === 'r'), 'nor under generation 0\'s prefix')
  t.equal(rule({}, 2).bucketKey(facts('10.0.0.1')), 'r~2', 'a rule without per')
})

t.test('generations reach the keys through the RuleSet; withGenerations keeps the rules', async (t) => {
  const specs = parseRules([
    { name: 'a', per: ['ip'], limit: 5, window: '1m' },
    { name: 'b', limit: 5, window: '1m' },
  ])
  const set = new RuleSet(specs, [], [], 7, { generations: { a: 2 } })
  t.same(set.bucketsFor(facts('10.0.0.1')).map((b) => b.key), ['a~2|10.0.0.1', 'b'])
  const next = set.withGenerations({ a: 2, b: 1 })
  t.same(next.bucketsFor(facts('10.0.0.1')).map((b) => b.key), ['a~2|10.0.0.1', 'b~1'])
  t.equal(next.version, 7)
  t.same(next.rules.map((r) => r.spec), set.rules.map((r) => r.spec))
  t.equal(generationOf({ a: 2 }, 'b'), 0, 'absent is 0')
  t.equal(generationOf({ a: 2 }, 'constructor'), 0, 'a rule named like an Object property is 0 too')
  t.equal(generationOf(JSON.parse('{"__proto__": 4}'), '__proto__'), 4)
})

t.test("the admin API's key builds the same key a request draws from", async (t) => {
  const cases: [Record<string, unknown>, RequestFacts, string[]][] = [
    [{ per: ['ip'] }, facts('10.0.0.1'), ['10.0.0.1']],
    [{ per: ['ip'] }, facts('2001:db8:1:2::77'), ['2001:db8:1:2:aaaa::1']], // another address of the same /64
    [{ per: ['header:x-api-key'] }, facts('10.0.0.1', { 'x-api-key': 'a|b' }), ['a|b']],
    [{ per: ['header:x-api-key'] }, facts('10.0.0.1', { 'x-api-key': 'z'.repeat(8192) }), ['z'.repeat(8192)]],
    [{ per: ['ip', 'path'] }, facts('10.0.0.1', {}, '/a b'), ['10.0.0.1', '/a b']],
  ]
  for (const [r, request, values] of cases) {
    const compiled = rule(r, 4)
    t.equal(compiled.keyOf(values), compiled.bucketKey(request), `${JSON.stringify(r.per)} ${values.join('|').slice(0, 40)}`)
  }
})

t.test('per: ip counts an IPv6 client by its /64 (or the prefix set), an IPv4 client by its address', async (t) => {
  const r = rule({ per: ['ip'] })
  t.equal(r.bucketKey(facts('2001:db8:1:2::1')), r.bucketKey(facts('2001:db8:1:2:ffff:ffff:ffff:ffff')), 'one /64, one bucket')
  t.equal(r.bucketKey(facts('2001:db8:1:2::1')), 'r|2001:db8:1:2::/64')
  t.not(r.bucketKey(facts('2001:db8:1:2::1')), r.bucketKey(facts('2001:db8:1:3::1')), 'the next /64 is another bucket')
  t.equal(r.bucketKey(facts('203.0.113.9')), 'r|203.0.113.9')
  t.not(r.bucketKey(facts('203.0.113.9')), r.bucketKey(facts('203.0.113.10')), 'IPv4 is never grouped')
  t.equal(r.bucketKey(facts('::ffff:203.0.113.9')), 'r|203.0.113.9', 'an IPv4-mapped address is its IPv4 address')
  const wide = rule({ per: ['ip'] }, 0, 48)
  t.equal(wide.bucketKey(facts('2001:db8:1:2::1')), wide.bucketKey(facts('2001:db8:1:3::1')), 'a /48 takes both')
  const exact = new RuleSet(parseRules([{ name: 'r', per: ['ip'], limit: 1, window: '1m' }]), [], [], 1, { ipv6Prefix: 128 })
  t.same(exact.bucketsFor(facts('2001:db8::1')).map((b) => b.key), ['r|2001:db8::1/128'], '128 keys each address')
  t.notOk(rule({ match: { ip: '2001:db8:1:2::1' } }).matches(facts('2001:db8:1:2::2')), 'match.ip still matches addresses, not networks')
})
