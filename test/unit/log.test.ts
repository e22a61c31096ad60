import { closeSync, fstatSync, mkdtempSync, openSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { AccessLog, createLogger, journaldStream } from '../../src/log.js'

/** A sink that keeps what is written (the access log writes to process.stdout in production). */
function collector(): { lines: () => Record<string, unknown>[]; text: () => string; write: (s: string) => void } {
  let text = ''
  return {
    write: (s: string) => (text += s),
    text: () => text,
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

t.test('an access-log line starts with its time, rounds durations to 3 decimals and leaves out absent members', async (t) => {
  const sink = collector()
  const log = new AccessLog(sink, 1)
  log.write({ time: 1, ip: '::1', method: 'GET', path: '/a', status: 429, bytes: 2, durationMs: 1.23456, upstreamMs: 2.0004, limited: 'per-"ip"' })
  log.write({ time: 2, ip: '::1', method: 'GET', path: '/b', status: 200, bytes: 3, durationMs: 0, upstreamMs: null, cache: 'HIT' })
  t.equal(sink.text(), '', 'nothing is written before the flush')
  log.flush()
  t.match(sink.text(), /^\{"time":"1970-01-01T00:00:00\.001Z",/)
  const [a, b] = sink.lines()
  t.same(a, {
    time: '1970-01-01T00:00:00.001Z', worker: 1, ip: '::1', method: 'GET', path: '/a', status: 429, bytes: 2,
    durationMs: 1.235, upstreamMs: 2, limited: 'per-"ip"',
  })
  t.same(b, { time: '1970-01-01T00:00:00.002Z', worker: 1, ip: '::1', method: 'GET', path: '/b', status: 200, bytes: 3, durationMs: 0, upstreamMs: null, cache: 'HIT' })
})

t.test('an event line has level, time, the base fields, the fields and msg; lower levels are dropped', async (t) => {
  const sink = collector()
  const log = createLogger('info', sink, { worker: 2 })
  log.debug('not shown', { a: 1 })
  log.info('started')
  log.warn('slow', { ms: 5 })
  const [started, slow, ...rest] = sink.lines()
  t.same(rest, [], 'the debug line is dropped')
  t.same(Object.keys(started!).sort(), ['level', 'msg', 'time', 'worker'], 'only the members asked for')
  t.equal(started!.level, 'info')
  t.match(started!.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
  t.same({ ...slow, time: 0 }, { level: 'warn', time: 0, worker: 2, ms: 5, msg: 'slow' })
})

t.test('a child logger adds its bindings to every line of its own', async (t) => {
  const sink = collector()
  const log = createLogger('debug', sink, { role: 'primary' })
  const child = log.child({ component: 'supervisor' })
  child.debug('worker listening', { worker: 1 })
  log.info('parent')
  const [a, b] = sink.lines()
  t.match(a, { level: 'debug', role: 'primary', component: 'supervisor', worker: 1, msg: 'worker listening' })
  t.notOk('component' in b!, 'the parent is unchanged')
})

t.test('a field named like a binding replaces it: one member per name', async (t) => {
  const sink = collector()
  const log = createLogger('info', sink, { role: 'primary', pid: 1 }).child({ component: 'supervisor' })
  log.info('worker died', { worker: 2, pid: 42 })
  t.equal((sink.text().match(/"pid"/g) ?? []).length, 1)
  t.match(sink.lines()[0], { role: 'primary', component: 'supervisor', worker: 2, pid: 42 })
})

t.test('credentials in logged fields are redacted', async (t) => {
  const sink = collector()
  const log = createLogger('info', sink, {})
  log.error('reload rejected', { error: '--redis-url: "redis://:s3cret@cache:6379" is not valid', authorization: 'Bearer s3cret' })
  log.info('meliproxy started', { upstream: 'http://user:s3cret@api.internal:8080', workers: 2 })
  t.notMatch(sink.text(), /s3cret/, 'no secret is written')
  const [a, b] = sink.lines()
  t.equal(a!.error, '--redis-url: "redis://[redacted]@cache:6379" is not valid')
  t.equal(a!.authorization, '[redacted]')
  t.equal(b!.upstream, 'http://[redacted]@api.internal:8080')
  t.equal(b!.workers, 2)
})

t.test('under journald each event line starts with its syslog priority; elsewhere lines are plain JSON', async (t) => {
  const lines: string[] = []
  const sink = { write: (s: string) => lines.push(s) }
  const log = createLogger('debug', sink, { role: 'primary' }, true)
  log.debug('d')
  log.info('i')
  log.warn('w')
  log.child({ worker: 1 }).error('e', { code: 'x' })
  t.same(lines.map((l) => l.slice(0, 3)), ['<7>', '<6>', '<4>', '<3>'], 'debug 7, info 6, warn 4, error 3 (RFC 5424)')
  t.same(JSON.parse(lines[3]!.slice(3)), { time: JSON.parse(lines[3]!.slice(3)).time, level: 'error', msg: 'e', role: 'primary', worker: 1, code: 'x' }, 'the rest is the JSON line')
  const plain: string[] = []
  createLogger('info', { write: (s: string) => plain.push(s) }, {}).error('e')
  t.equal(plain[0]![0], '{', 'without it, no prefix')

  // journald is recognised by JOURNAL_STREAM naming this very stream (device:inode), as systemd sets it.
  const dir = mkdtempSync(join(tmpdir(), 'meliproxy-log-'))
  const fd = openSync(join(dir, 'stream'), 'w')
  t.teardown(() => closeSync(fd))
  const s = fstatSync(fd)
  t.ok(journaldStream(fd, { JOURNAL_STREAM: `${s.dev}:${s.ino}` }), 'its own device:inode')
  t.notOk(journaldStream(fd, { JOURNAL_STREAM: `${s.dev}:${s.ino + 1}` }), 'another stream (output redirected elsewhere)')
  t.notOk(journaldStream(fd, {}), 'not set')
})
