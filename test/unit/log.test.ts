import t from 'tap'
import { AccessLog } from '../../src/log.js'

/** A sink that keeps what is written (the access log writes to process.stdout in production). */
function collector(): { lines: () => Record<string, unknown>[]; write: (s: string) => void } {
  let text = ''
  return {
    write: (s: string) => (text += s),
    lines: () => text.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>),
  }
}

t.test('access-log lines are valid JSON, escaping quotes, backslashes, control and non-ASCII characters', async (t) => {
  const sink = collector()
  const log = new AccessLog(sink, 3)
  const paths = ['/plain?x=1', '/q"uote', '/back\\slash', '/ctl\u0001', '/caf\u00e9']
  for (const path of paths) {
    log.write({ time: 0, ip: '127.0.0.1', method: 'GET', path, status: 200, bytes: 1, durationMs: 1.5, upstreamMs: null })
  }
  log.flush()
  const lines = sink.lines()
  t.same(lines.map((l) => l.path), paths, 'every path survives the round trip')
  t.equal(lines[0]!.worker, 3)
  t.equal(lines[0]!.upstreamMs, null)
  t.equal(lines[0]!.time, '1970-01-01T00:00:00.000Z')
})
