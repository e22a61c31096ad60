import { readFileSync } from 'node:fs'
import t from 'tap'
import { ErrorCodes, ERRORS, errorBody, MeliproxyError, UpstreamTimeoutError } from '../../src/errors.js'

t.test('every code is declared once, and every named constant is a registered code', async (t) => {
  const names = Object.values(ErrorCodes)
  t.equal(new Set(names).size, names.length, 'no two constants share a code')
  t.same(new Set(names), new Set(Object.keys(ERRORS)), 'the constants and the registry list the same codes')
})

t.test('an error takes its status from the registry and serialises to the client body', async (t) => {
  const e = new UpstreamTimeoutError('upstream did not answer in time')
  t.equal(e.status, 504)
  t.same(JSON.parse(JSON.stringify(e)), { error: 'upstream_timeout', message: 'upstream did not answer in time' })
  const withField = new MeliproxyError(ErrorCodes.BAD_REQUEST, 'limit: "x" is not a number', 'limit')
  t.same(JSON.parse(errorBody(withField, { extra: 1 })), { error: 'bad_request', message: 'limit: "x" is not a number', field: 'limit', extra: 1 })
})

t.test("the README's error lists name exactly the registered codes, with their statuses", async (t) => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8')
  const client = /Client errors are JSON:[\s\S]*?\n\n/.exec(readme)?.[0] ?? ''
  const admin = /Admin errors are JSON[\s\S]*?\n\n/.exec(readme)?.[0] ?? ''
  t.ok(client.length > 0 && admin.length > 0, 'both lists are in the README')
  const listed = new Map<string, number | null>()
  for (const m of (client + admin).matchAll(/`([a-z_]+)`(?:\s\((\d{3})[,)])?/g)) {
    if (m[1] === 'error' || m[1] === 'message' || m[1] === 'field') continue
    listed.set(m[1]!, m[2] === undefined ? null : Number(m[2]))
  }
  const registered = Object.keys(ERRORS).filter((c) => c !== 'config_invalid')
  t.same([...listed.keys()].sort(), registered.sort(), 'the same codes')
  for (const [code, status] of listed) {
    if (status !== null) t.equal(status, ERRORS[code as keyof typeof ERRORS], `${code}: ${status}`)
  }
})
