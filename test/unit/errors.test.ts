import t from 'tap'
import { ErrorCodes, UpstreamTimeoutError } from '../../src/errors.js'

t.test('every error code is unique', async (t) => {
  const codes = Object.values(ErrorCodes)
  t.equal(new Set(codes).size, codes.length)
})

t.test('an error serialises to the client body with its code and message only', async (t) => {
  const e = new UpstreamTimeoutError('upstream did not answer in time')
  t.equal(e.status, 504)
  t.same(JSON.parse(JSON.stringify(e)), { error: 'upstream_timeout', message: 'upstream did not answer in time' })
})
