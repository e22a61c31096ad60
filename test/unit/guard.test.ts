import t from 'tap'
import { dropUnderscored, headerProblem, transferCodingProblem, transferEncoding, transferEncodingProblem, versionProblem } from '../../src/proxy/guard.js'

t.test('Transfer-Encoding: exactly chunked passes; another coding is 501; a malformed list is 400', async (t) => {
  for (const ok of ['chunked', 'CHUNKED', 'Chunked', ' chunked ', 'chunked\t']) t.equal(transferCodingProblem(ok), null, JSON.stringify(ok))
  const cases: [string, number, string][] = [
    ['cunked, chunked', 501, 'unknown_transfer_coding'], // two field lines, joined
    ['gzip, chunked', 501, 'unknown_transfer_coding'],
    ['gzip', 501, 'unknown_transfer_coding'],
    ['identity', 501, 'unknown_transfer_coding'],
    ['chunked, gzip', 501, 'unknown_transfer_coding'],
    [',chunked', 400, 'bad_request'],
    ['chunked,', 400, 'bad_request'],
    ['chunked, , chunked', 400, 'bad_request'],
    ['gzip, , chunked', 400, 'bad_request'], // malformed before unknown
    ['', 400, 'bad_request'],
    ['chunked, chunked', 400, 'bad_request'],
    ['chunked;a=b', 400, 'bad_request'],
    ['chu nked', 400, 'bad_request'],
    ['"chunked"', 400, 'bad_request'],
  ]
  for (const [value, status, code] of cases) {
    const e = transferCodingProblem(value)
    t.equal(e?.status, status, `${JSON.stringify(value)}: ${status}`)
    t.equal(e?.code, code)
  }
})

t.test('every Transfer-Encoding field line is read from the raw headers, joined as one list', async (t) => {
  t.equal(transferEncoding(['Host', 'x', 'Content-Length', '5']), null)
  t.equal(transferEncoding(['Transfer-Encoding', 'cunked', 'Host', 'x', 'transfer-encoding', 'chunked']), 'cunked, chunked')
  t.equal(transferEncoding(['TRANSFER-ENCODING', ',chunked']), ',chunked')
  t.equal(transferEncoding(['Transfer_Encoding', 'chunked']), null, 'an underscored name is another field')
})

t.test('versions: 1.1 and 1.0 pass; 0.9 is 400; any other is 505', async (t) => {
  t.equal(versionProblem(1, 1), null)
  t.equal(versionProblem(1, 0), null)
  t.equal(versionProblem(0, 9)?.status, 400)
  t.equal(versionProblem(2, 0)?.status, 505)
  t.equal(versionProblem(2, 0)?.code, 'http_version_not_supported')
  t.equal(versionProblem(1, 2)?.status, 505)
})

t.test('dropUnderscored removes every field named with "_" from the parsed headers, and only those', async (t) => {
  const headers: Record<string, unknown> = { host: 'x', transfer_encoding: 'chunked', 'x-fine': '1', x_api_key: 'k' }
  t.equal(dropUnderscored(['Host', 'x', 'Transfer_Encoding', 'chunked', 'X-Fine', '1', 'X_Api_Key', 'k'], headers), 2)
  t.same(headers, { host: 'x', 'x-fine': '1' })
  const clean: Record<string, unknown> = { host: 'x' }
  t.equal(dropUnderscored(['Host', 'x'], clean), 0)
  t.same(clean, { host: 'x' })
})

t.test('headerProblem: Host once in HTTP/1.1; "_" names refused only with reject', async (t) => {
  t.equal(headerProblem(['Host', 'x', 'X_A', '1'], '1.1', 'drop'), null)
  t.equal(headerProblem(['Host', 'x', 'X_A', '1'], '1.1', 'reject')?.status, 400)
  t.equal(headerProblem([], '1.1', 'drop')?.status, 400)
  t.equal(headerProblem([], '1.0', 'drop'), null)
  t.equal(headerProblem(['Host', 'x', 'host', 'y'], '1.1', 'allow')?.status, 400)
})

t.test('Transfer-Encoding in HTTP/1.0 is 400 whatever the coding (RFC 9112 6.1); in HTTP/1.1 it is read as above', async (t) => {
  const chunked = ['Transfer-Encoding', 'chunked']
  t.equal(transferEncodingProblem(chunked, '1.1'), null)
  t.equal(transferEncodingProblem(chunked, '1.0')?.status, 400)
  t.equal(transferEncodingProblem(['Transfer-Encoding', 'gzip'], '1.0')?.status, 400)
  t.equal(transferEncodingProblem(['Transfer-Encoding', 'gzip'], '1.1')?.status, 501)
})
