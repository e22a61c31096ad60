import t from 'tap'
import { clientNetwork, IpSet, parseCidr, type Cidr } from '../../src/net/ip.js'

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

t.test('clientNetwork: an IPv6 client is its network in RFC 5952 form; IPv4 stays the address, and IPv4-mapped in any form becomes it', async (t) => {
  t.equal(clientNetwork('2001:db8:1:2:3:4:5:6', 64), '2001:db8:1:2::/64')
  t.equal(clientNetwork('2001:db8:1:2::ffff', 64), '2001:db8:1:2::/64', 'another address of the same /64')
  t.equal(clientNetwork('2001:0DB8:0001:0002:0000:0000:0000:0001', 64), '2001:db8:1:2::/64', 'any spelling of it')
  t.equal(clientNetwork('2001:db8:1:3::1', 64), '2001:db8:1:3::/64', 'the next /64 is another network')
  t.equal(clientNetwork('2001:db8:1:2:3:4:5:6', 48), '2001:db8:1::/48')
  t.equal(clientNetwork('2001:db8:1:2:3:4:5:6', 56), '2001:db8:1::/56', 'a prefix inside a group')
  t.equal(clientNetwork('2001:db8:1:2ff:3:4:5:6', 56), '2001:db8:1:200::/56')
  t.equal(clientNetwork('2001:db8:1:2:3:4:5:6', 128), '2001:db8:1:2:3:4:5:6/128')
  t.equal(clientNetwork('ffff::1', 1), '8000::/1')
  t.equal(clientNetwork('::1', 64), '::/64')
  t.equal(clientNetwork('::', 64), '::/64')
  t.equal(clientNetwork('fe80::1%eth0', 64), 'fe80::/64', 'a zone is ignored')
  t.equal(clientNetwork('64:ff9b::192.0.2.1', 128), '64:ff9b::c000:201/128', 'an embedded IPv4 tail')
  t.equal(clientNetwork('2001:db8:0:0:1:0:0:1', 128), '2001:db8::1:0:0:1/128', 'the first of two equal zero runs is ::')
  t.equal(clientNetwork('2001:db8:0:1:1:1:1:1', 128), '2001:db8:0:1:1:1:1:1/128', 'one zero group is not ::')

  t.equal(clientNetwork('203.0.113.9', 64), '203.0.113.9', 'IPv4: the address')
  t.equal(clientNetwork('::ffff:203.0.113.9', 64), '203.0.113.9', 'IPv4-mapped: the IPv4 address')
  t.equal(clientNetwork('::ffff:cb00:7109', 64), '203.0.113.9', 'IPv4-mapped in hex too')
  t.equal(clientNetwork('::FFFF:203.0.113.9', 64), '203.0.113.9', 'in capitals')
  t.equal(clientNetwork('0:0:0:0:0:ffff:203.0.113.9', 64), '203.0.113.9', 'written out in full')
  t.equal(clientNetwork('not:an:address', 64), 'not:an:address', 'not an address: unchanged')
  t.equal(clientNetwork('', 64), '')
})
