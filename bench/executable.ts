import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { createServer as createHttpServer, get } from 'node:http'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { flag } from './args.js'
import { freePort } from './ports.js'

/**
 * `npm run bench:executable` (after `npm run package`): the single executable against bin/meliproxy, in one run on
 * one machine. For each, --runs times (default 5), the time from spawn to the first answered proxied request (two
 * workers), then cache-hit throughput with autocannon (--connections, default 32; 3 s warm-up, then --duration S,
 * default 5), twice each, alternating. Prints the figures; no pass/fail.
 */

const RUNS = flag('--runs', 5)
const CONNECTIONS = flag('--connections', 32)
const DURATION = flag('--duration', 5)

const here = (p: string): string => fileURLToPath(new URL(p, import.meta.url))
const VERSION = (JSON.parse(readFileSync(here('../../package.json'), 'utf8')) as { version: string }).version
const EXE = here(`../../build/package/meliproxy-${VERSION}-linux-x64`)
const BIN = here('../../bin/meliproxy')
type Autocannon = (o: { url: string; connections: number; duration: number }) => Promise<{ requests: { average: number }; non2xx: number }>
const autocannon = createRequire(import.meta.url)('autocannon') as Autocannon

const status = (url: string): Promise<number> =>
  new Promise((resolve) => {
    const r = get(url, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode ?? 0))
    })
    r.on('error', () => resolve(0))
  })

const env = { ...process.env }
delete env.NODE_OPTIONS

async function start(kind: 'executable' | 'bin/meliproxy', upstream: string): Promise<{ proc: ChildProcess; ms: number; url: string }> {
  const port = await freePort()
  const adminPort = await freePort()
  const flags = ['--port', String(port), '--host', '127.0.0.1', '--admin-port', String(adminPort), '--workers', '2', '--upstream', upstream, '--no-access-log', '--log-level', 'warn']
  const url = `http://127.0.0.1:${port}/items/MLA1`
  const t0 = performance.now()
  const proc = kind === 'executable' ? spawn(EXE, flags, { env, stdio: 'ignore' }) : spawn(process.execPath, [BIN, ...flags], { env, stdio: 'ignore' })
  const deadline = Date.now() + 30_000
  while ((await status(url)) !== 200) {
    if (Date.now() > deadline) throw new Error(`${kind} did not answer within 30 s`)
    await new Promise((r) => setTimeout(r, 5))
  }
  return { proc, ms: performance.now() - t0, url }
}

const stop = (proc: ChildProcess): Promise<void> =>
  new Promise((resolve) => {
    proc.once('exit', () => resolve())
    proc.kill('SIGTERM')
  })

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

async function main(): Promise<void> {
  if (!existsSync(EXE)) throw new Error(`${EXE} is missing: run npm run package first`)
  const body = '{"id":"MLA1"}'.padEnd(1024, ' ')
  const up = createHttpServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=600' })
    res.end(body)
  })
  await new Promise<void>((r) => up.listen(0, '127.0.0.1', r))
  const address = up.address()
  const upstream = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`
  const kinds = ['executable', 'bin/meliproxy'] as const
  const startMs: Record<string, number[]> = { executable: [], 'bin/meliproxy': [] }
  for (let i = 0; i < RUNS; i++) {
    for (const kind of kinds) {
      const s = await start(kind, upstream)
      startMs[kind]!.push(Math.round(s.ms))
      await stop(s.proc)
    }
  }
  for (const kind of kinds) console.log(`${kind.padEnd(14)} start to first answer: median ${median(startMs[kind]!)} ms (${startMs[kind]!.join(', ')})`)
  for (const kind of [...kinds, ...kinds]) {
    const s = await start(kind, upstream)
    await autocannon({ url: s.url, connections: CONNECTIONS, duration: 3 })
    const r = await autocannon({ url: s.url, connections: CONNECTIONS, duration: DURATION })
    console.log(`${kind.padEnd(14)} cache hit: ${Math.round(r.requests.average)} req/s (${CONNECTIONS} connections, ${DURATION} s, non-2xx ${r.non2xx})`)
    await stop(s.proc)
  }
  up.close()
}

main().catch((err: Error) => {
  process.stderr.write(`bench:executable: ${err.message}\n`)
  process.exit(1)
})
