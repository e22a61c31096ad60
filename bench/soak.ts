import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { childPids, rssMb } from './procs.js'

/**
 * `npm run bench -- --soak`: memory under a long stream of distinct URLs. meliproxy (cache on, L1 bounded) serves
 * `urls` distinct cacheable URLs in a cycle for `seconds`; every 2 s each worker's RSS and the L1 bytes are sampled.
 * The claim checked: RSS per worker stays within the L1 bound plus a fixed overhead (OVERHEAD_MB).
 */

/** What a worker holds besides L1: V8 heap of the code, undici and ioredis buffers, socket buffers, metrics. */
export const OVERHEAD_MB = 180

export interface SoakOptions {
  readonly seconds: number
  readonly urls: number
  readonly l1Mb: number
  readonly workers: number
  readonly connections: number
  readonly bin: string
  readonly servers: string
  readonly freePort: () => Promise<number>
}

async function l1Bytes(adminUrl: string): Promise<number> {
  try {
    const text = await (await fetch(`${adminUrl}/metrics`)).text()
    let sum = 0
    for (const line of text.split('\n')) if (line.startsWith('meliproxy_cache_l1_bytes')) sum += Number(line.split(' ').pop())
    return sum
  } catch {
    return NaN
  }
}

export async function soak(o: SoakOptions): Promise<void> {
  if (spawnSync('sh', ['-c', 'command -v wrk']).status !== 0) throw new Error('--soak needs wrk (apt-get install wrk)')
  const [upPort, port, adminPort] = [await o.freePort(), await o.freePort(), await o.freePort()]
  const started: ChildProcess[] = []
  const launch = (cmd: string, argv: string[]): ChildProcess => {
    const p = spawn(cmd, argv, { stdio: ['ignore', 'ignore', 'inherit'] })
    started.push(p)
    return p
  }
  try {
    launch(process.execPath, [o.servers, 'upstream', String(upPort)])
    const proxy = launch(process.execPath, [
      o.bin, '--port', String(port), '--host', '127.0.0.1', '--admin-port', String(adminPort), '--workers', String(o.workers),
      '--upstream', `http://127.0.0.1:${upPort}`, '--cache-l1-size', `${o.l1Mb}mb`, '--log-level', 'warn',
    ])
    const adminUrl = `http://127.0.0.1:${adminPort}`
    for (let i = 0; i < 100; i++) {
      if ((await fetch(`${adminUrl}/readyz`).catch(() => null))?.status === 200) break
      await new Promise((r) => setTimeout(r, 100))
    }
    const workers = childPids(proxy.pid!)
    const dir = mkdtempSync(join(tmpdir(), 'meliproxy-soak-'))
    const script = join(dir, 'urls.lua')
    writeFileSync(script, `local n = 0\nrequest = function()\n  n = (n + 1) % ${o.urls}\n  return wrk.format("GET", "/items/MLA" .. n)\nend\n`)
    console.log(`meliproxy soak: ${o.seconds}s, ${o.urls} distinct URLs, L1 ${o.l1Mb} MB per worker, ${o.workers} workers, wrk ${o.connections} connections`)
    console.log(`claim: each worker's RSS <= L1 bound + ${OVERHEAD_MB} MB = ${o.l1Mb + OVERHEAD_MB} MB\n`)
    console.log('   s  ' + workers.map((_, i) => `worker${i + 1} MB`.padStart(12)).join('') + '   L1 MB (all workers)')
    const baseline = workers.map(rssMb)
    const peak = [...baseline]
    const wrk = spawn('wrk', ['-t1', `-c${o.connections}`, `-d${o.seconds}s`, '-s', script, `http://127.0.0.1:${port}`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    let wrkOut = ''
    wrk.stdout!.on('data', (c: Buffer) => (wrkOut += c))
    const done = new Promise<void>((r) => wrk.once('exit', () => r()))
    const began = Date.now()
    let finished = false
    void done.then(() => (finished = true))
    const sample = async (): Promise<void> => {
      const rss = workers.map(rssMb)
      rss.forEach((v, i) => (peak[i] = Math.max(peak[i]!, v)))
      const l1 = (await l1Bytes(adminUrl)) / 1024 / 1024
      console.log(`${String(Math.round((Date.now() - began) / 1000)).padStart(4)}  ${rss.map((v) => v.toFixed(0).padStart(12)).join('')}   ${l1.toFixed(1).padStart(8)}`)
    }
    await sample()
    while (!finished) {
      await Promise.race([done, new Promise((r) => setTimeout(r, 2_000))])
      await sample()
    }
    const rps = /Requests\/sec:\s+([\d.]+)/.exec(wrkOut)?.[1] ?? '?'
    console.log(`\nload: ${rps} req/s; start RSS ${baseline.map((v) => v.toFixed(0)).join(', ')} MB; peak RSS ${peak.map((v) => v.toFixed(0)).join(', ')} MB`)
    const ok = peak.every((v) => v <= o.l1Mb + OVERHEAD_MB)
    console.log(`peak RSS per worker within L1 bound + ${OVERHEAD_MB} MB: ${ok ? 'yes' : 'NO'}`)
    if (!ok) process.exitCode = 1
  } finally {
    for (const p of started) if (p.exitCode === null) p.kill('SIGTERM')
  }
}
