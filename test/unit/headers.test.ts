import t from 'tap'
import { clientResponseHeaders, upstreamRequestHeaders, VIA } from '../../src/proxy/headers.js'

const pairs = (flat: string[]): [string, string][] => {
  const out: [string, string][] = []
  for (let i = 0; i < flat.length; i += 2) out.push([flat[i]!, flat[i + 1]!])
  return out
}

t.test('a trusted proxy keeps its X-Forwarded-Proto and X-Forwarded-Host; Via is appended', async (t) => {
  const out = pairs(
    upstreamRequestHeaders({
      rawHeaders: ['Host', 'front.example', 'X-Forwarded-Proto', 'https', 'X-Forwarded-Host', 'api.example', 'Via', '1.1 lb'],
      headers: { host: 'front.example' },
      peerIp: '10.0.0.2',
      peerTrusted: true,
      upstreamHost: 'api.mercadolibre.com',
      dropUnderscored: false,
    }),
  )
  t.same(out.find(([k]) => k === 'host'), ['host', 'api.mercadolibre.com'])
  t.same(out.find(([k]) => k.toLowerCase() === 'x-forwarded-proto'), ['X-Forwarded-Proto', 'https'])
  t.same(out.find(([k]) => k.toLowerCase() === 'x-forwarded-host'), ['X-Forwarded-Host', 'api.example'])
  t.same(out.find(([k]) => k === 'via'), ['via', `1.1 lb, ${VIA}`])
  t.same(out.find(([k]) => k === 'x-forwarded-for'), ['x-forwarded-for', '10.0.0.2'])
  t.equal(out.filter(([k]) => k.toLowerCase() === 'host').length, 1, 'one Host only')
})

t.test('Expect and Transfer-Encoding are never forwarded as headers', async (t) => {
  const out = pairs(
    upstreamRequestHeaders({
      rawHeaders: ['Expect', '100-continue', 'Transfer-Encoding', 'chunked', 'Upgrade', 'websocket'],
      headers: {},
      peerIp: '127.0.0.1',
      peerTrusted: false,
      upstreamHost: 'u',
      dropUnderscored: false,
    }),
  )
  t.same(out.filter(([k]) => /expect|transfer-encoding|upgrade/i.test(k)), [])
})

t.test('response: repeated values stay separate lines; Trailer and Transfer-Encoding are dropped', async (t) => {
  const out = pairs(
    clientResponseHeaders({
      'set-cookie': ['a=1', 'b=2'],
      'transfer-encoding': 'chunked',
      trailer: 'x-checksum',
      via: '1.1 origin',
      'content-type': 'application/json',
    }),
  )
  t.same(out, [
    ['set-cookie', 'a=1'],
    ['set-cookie', 'b=2'],
    ['content-type', 'application/json'],
    ['via', `1.1 origin, ${VIA}`],
  ])
})
