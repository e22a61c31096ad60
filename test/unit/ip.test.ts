import t from 'tap'
import { IpSet, parseCidr, type Cidr } from '../../src/net/ip.js'

const set = (...c: string[]): IpSet => new IpSet(c.map((x) => parseCidr(x) as Cidr))

t.test('IPv4 ranges match by prefix', async (t) => {
  const s = set('10.0.0.0/8', '192.168.1.7', '172.16.0.0/12')
  t.ok(s.has('10.255.1.2'))
  t.ok(s.has('192.168.1.7'))
  t.notOk(s.has('192.168.1.8'))
  t.ok(s.has('172.31.255.255'))
  t.notOk(s.has('172.32.0.0'))
  t.ok(s.has('::ffff:10.1.1.1'), 'v4-mapped v6 is v4')
  t.notOk(s.has('10.0.0'), 'not an address')
  t.notOk(s.has('10.0.0.256'), 'octet out of range')
  t.notOk(s.has('::1'))
})

t.test('0.0.0.0/0 matches every IPv4 address; IPv6 ranges match IPv6', async (t) => {
  t.ok(set('0.0.0.0/0').has('203.0.113.9'))
  const s = set('2001:db8::/32')
  t.ok(s.has('2001:db8::1'))
  t.notOk(s.has('2001:db9::1'))
  t.notOk(s.has('1.2.3.4'))
})

t.test('bad CIDRs are reported, not thrown', async (t) => {
  t.match(parseCidr('10.0.0.0/33'), /prefix length/)
  t.match(parseCidr('nope'), /not an IP/)
})
