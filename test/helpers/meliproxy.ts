import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { request } from 'undici'
import { freePort } from './ports.js'

/** The built binary the tests run (npm test builds it first). */
export const BIN = fileURLToPath(new URL('../../bin/meliproxy', import.meta.url))

/** A running meliproxy: the real binary, its primary and workers. */
export interface RunningProxy {
  readonly proc: ChildProcess
  readonly port: number
  readonly adminPort: number
  readonly url: string
  readonly adminUrl: string
  readonly stdout: string[]
  readonly stderr: string[]
  /** PIDs of the primary's live child processes (the workers), read from /proc. */
  workerPids(): number[]
  /** Resolves with the exit code (or signal name) once the primary exits. */
  readonly exited: Promise<number | string>
  /** SIGTERM, wait; then SIGKILL whatever of ours is left. */
  stop(): Promise<void>
}

/** Whether a process with this PID exists (signal 0 checks without sending anything). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

/** Child PIDs of `pid`, from /proc (Linux). */
export function childPids(pid: number): number[] {
  const out: number[] = []
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8')
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
      if (ppid === pid) out.push(Number(entry))
    } catch {
      // the process went away while we looked
    }
  }
  return out
}

/**
 * The command line that runs the binary. tap's process-info plugin injects its loaders into every spawned node
 * through NODE_OPTIONS; `env -u` (which execs, keeping the PID) runs the binary as a user would. `executable`: a
 * single executable (`npm run package`) run instead of node with bin/meliproxy.
 */
export function binCommand(args: string[], executable?: string): [string, string[]] {
  if (executable !== undefined) return ['env', ['-u', 'NODE_OPTIONS', executable, ...args]]
  return ['env', ['-u', 'NODE_OPTIONS', process.execPath, BIN, ...args]]
}

/** An environment for the binary without tap's loader options. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (k === 'NODE_OPTIONS' || k.startsWith('MELIPROXY_') || k.startsWith('TAP') || k.startsWith('_TAP')) continue
    env[k] = v
  }
  return { ...env, ...extra }
}

/** Runs the binary to completion (for bad-input checks). */
export function runBinary(
  args: string[],
  env: Record<string, string> = {},
  executable?: string,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const [cmd, argv] = binCommand(args, executable)
    const p = spawn(cmd, argv, { env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', (c: Buffer) => (stdout += c))
    p.stderr.on('data', (c: Buffer) => (stderr += c))
    // Generous: a busy machine starts node slowly (these runs end by themselves in well under a second otherwise).
    const timer = setTimeout(() => p.kill('SIGKILL'), 30_000)
    p.on('close', (code) => {
      clearTimeout(timer)
      resolve({ code, stdout, stderr })
    })
  })
}

/** Polls `check` every 50 ms until it returns true or `ms` pass; returns whether it did. */
export async function waitFor(check: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    if (await check()) return true
    await new Promise((r) => setTimeout(r, 50))
  }
  return false
}

/** GET on the admin listener, parsed as JSON when it is. */
export async function admin(p: RunningProxy, path: string): Promise<{ status: number; body: any; text: string }> {
  const res = await request(p.adminUrl + path)
  const text = await res.body.text()
  let body: unknown = null
  try {
    body = JSON.parse(text)
  } catch {
    body = null
  }
  return { status: res.statusCode, body, text }
}

/** Starts the binary (or `executable`) with free ports and `args`, and waits until /readyz says every worker listens. */
export async function startMeliproxy(
  args: string[],
  opts: { env?: Record<string, string>; workers?: number; port?: number; adminPort?: number; waitReady?: boolean; executable?: string } = {},
): Promise<RunningProxy> {
  const port = opts.port ?? (await freePort())
  const adminPort = opts.adminPort ?? (await freePort())
  const workers = opts.workers ?? 2
  const [cmd, argv] = binCommand([
    '--port', String(port),
    '--host', '127.0.0.1',
    '--admin-port', String(adminPort),
    '--workers', String(workers),
    ...args,
  ], opts.executable)
  const proc = spawn(cmd, argv, { env: cleanEnv(opts.env), stdio: ['ignore', 'pipe', 'pipe'] })
  const stdout: string[] = []
  const stderr: string[] = []
  const collect = (into: string[]) => {
    let partial = ''
    return (chunk: Buffer) => {
      const lines = (partial + chunk.toString()).split('\n')
      partial = lines.pop() ?? ''
      into.push(...lines)
    }
  }
  proc.stdout!.on('data', collect(stdout))
  proc.stderr!.on('data', collect(stderr))
  const exited = new Promise<number | string>((resolve) =>
    proc.once('exit', (code, signal) => resolve(code ?? signal ?? 'unknown')),
  )
  let gone = false
  void exited.then(() => (gone = true))
  const running: RunningProxy = {
    proc,
    port,
    adminPort,
    url: `http://127.0.0.1:${port}`,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    stdout,
    stderr,
    exited,
    workerPids: () => childPids(proc.pid!),
    async stop() {
      if (gone) return
      const workersLeft = childPids(proc.pid!)
      proc.kill('SIGTERM')
      // Generous for a busy machine (a drain, a --shutdown-delay); the timer is cleared so that it keeps nothing alive.
      let timer: NodeJS.Timeout | undefined
      const done = await Promise.race([exited.then(() => true), new Promise((r) => (timer = setTimeout(() => r(false), 15_000)))])
      clearTimeout(timer)
      if (done) return
      proc.kill('SIGKILL')
      for (const pid of workersLeft) {
        try {
          process.kill(pid, 'SIGKILL')
        } catch {
          // already gone
        }
      }
    },
  }
  if (opts.waitReady === false) return running
  const ready = await waitFor(async () => {
    if (gone) return false
    try {
      const r = await admin(running, '/readyz')
      // Redis is no reason for /readyz to fail; a test that configures it waits for the connection too.
      return r.status === 200 && r.body?.workers?.listening === workers && r.body?.redis !== 'unreachable'
    } catch {
      return false
    }
  }, 30_000) // a primary, its workers and perhaps a Redis connection: slow to start on a busy machine
  if (!ready) {
    await running.stop()
    throw new Error(`meliproxy did not become ready; stderr:\n${stderr.join('\n')}`)
  }
  return running
}

/**
 * Starts instances at once, one per argument list; when one fails to start, the others are stopped before the error
 * is thrown (a test file's teardown never sees them, and they would keep it running until tap's timeout).
 */
export async function startTogether<T extends string[][]>(argsList: [...T]): Promise<{ [K in keyof T]: RunningProxy }> {
  const settled = await Promise.allSettled(argsList.map((args) => startMeliproxy(args)))
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected')
  if (failed !== undefined) {
    await Promise.all(settled.map((r) => (r.status === 'fulfilled' ? r.value.stop() : undefined)))
    throw failed.reason
  }
  return settled.map((r) => (r as PromiseFulfilledResult<RunningProxy>).value) as { [K in keyof T]: RunningProxy }
}

/** Writes a config file (JSON, which the binary reads by its extension) into a fresh temp folder; returns its path. */
export function writeConfig(doc: Record<string, unknown>, name = 'meliproxy.json'): string {
  const dir = mkdtempSync(join(tmpdir(), 'meliproxy-config-'))
  const path = join(dir, name)
  writeFileSync(path, JSON.stringify(doc, null, 2))
  return path
}

/** Any admin call: method, path, an optional JSON body and bearer token; the answer parsed as JSON. */
export async function adminCall(
  p: RunningProxy,
  method: string,
  path: string,
  opts: { body?: unknown; token?: string } = {},
): Promise<{ status: number; body: any }> {
  const headers: Record<string, string> = {}
  if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`
  if (opts.body !== undefined) headers['content-type'] = 'application/json'
  const res = await request(p.adminUrl + path, {
    method: method as 'GET',
    headers,
    body: opts.body === undefined ? undefined : typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body),
  })
  const text = await res.body.text()
  let body: unknown = text
  try {
    body = JSON.parse(text)
  } catch {
    // not JSON: the text is returned
  }
  return { status: res.statusCode, body }
}
