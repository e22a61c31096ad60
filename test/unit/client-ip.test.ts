import t from 'tap'
import { IpSet, parseCidr, type Cidr } from '../../src/net/ip.js'
import { clientIp } from '../../src/net/client-ip.js'

const trusted = new IpSet(['10.0.0.0/8', '127.0.0.1'].map((c) => parseCidr(c) as Cidr))

t.test('an untrusted peer is the client, whatever X-Forwarded-For says', async (t) => {
  t.equal(clientIp('203.0.113.5', '152.152.152.152', trusted), '203.0.113.5')
})

t.test('behind trusted proxies the right-most untrusted entry is the client', async (t) => {
  t.equal(clientIp('10.0.0.2', '152.152.152.152', trusted), '152.152.152.152')
  t.equal(clientIp('10.0.0.2', '1.1.1.1, 152.152.152.152, 10.0.0.9', trusted), '152.152.152.152', 'spoofed left entries are ignored')
  t.equal(clientIp('10.0.0.2', ['1.1.1.1', '152.152.152.152'], trusted), '152.152.152.152', 'repeated header lines join')
})

t.test('all-trusted chains give the left-most hop; garbage stops at the last trusted hop', async (t) => {
  t.equal(clientIp('10.0.0.2', '10.0.0.7, 10.0.0.8', trusted), '10.0.0.7')
  t.equal(clientIp('10.0.0.2', 'evil, 10.0.0.8', trusted), '10.0.0.8')
  t.equal(clientIp('127.0.0.1', '::ffff:152.152.152.152', trusted), '152.152.152.152')
})

t.test('no header means the peer', async (t) => {
  t.equal(clientIp('10.0.0.2', undefined, trusted), '10.0.0.2')
})
