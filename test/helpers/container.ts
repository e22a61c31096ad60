import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { waitFor } from './meliproxy.js'

/**
 * A Debian system booted with its own systemd as PID 1 (systemd-nspawn --boot), to run the Debian package as a VM
 * does: dpkg installs it, systemd starts, reloads, restarts and stops it. The container shares this machine's network
 * (so a test reaches its ports on 127.0.0.1) and runs on a throw-away copy of the root file system (--ephemeral):
 * the prepared root stays clean for the next run. Commands run inside through nsenter.
 */

/** The Debian root file system the tests boot: made by debootstrap in .ci/run (see README, "Two commands"). */
export const TEST_ROOTFS = process.env.MELIPROXY_TEST_ROOTFS ?? '/var/tmp/meliproxy-test-rootfs/debian'

/** Why a container cannot be booted here, or null when it can. */
export function containerUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'booting a container needs root'
  if (spawnSync('sh', ['-c', 'command -v systemd-nspawn && command -v nsenter']).status !== 0) {
    return 'systemd-nspawn is not installed (apt-get install systemd-container, as .ci/run does)'
  }
  if (!existsSync(`${TEST_ROOTFS}/usr/bin/systemctl`)) {
    return `no Debian root file system with systemd at ${TEST_ROOTFS} (.ci/run makes it with debootstrap)`
  }
  return null
}

export interface Container {
  /** Runs a shell command inside (as root); its exit status and output. */
  sh(command: string, timeoutMs?: number): { status: number | null; stdout: string; stderr: string }
  /** Powers the container off and waits for it (SIGKILL after 30 s). */
  stop(): Promise<void>
}

/** Boots the container with `binds` (host path -> path inside, read-only) and waits until its systemd is up. */
export async function bootContainer(binds: Record<string, string>): Promise<Container> {
  const nspawn: ChildProcess = spawn(
    'systemd-nspawn',
    ['--quiet', '--register=no', '--keep-unit', '--ephemeral', '--boot', '-D', TEST_ROOTFS,
      ...Object.entries(binds).map(([host, inside]) => `--bind-ro=${host}:${inside}`)],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  )
  let stderr = ''
  nspawn.stderr!.on('data', (c: Buffer) => (stderr += c.toString()))
  const exited = new Promise<void>((resolve) => nspawn.once('exit', () => resolve()))
  let leader = 0
  const sh: Container['sh'] = (command, timeoutMs = 60_000) => {
    const r = spawnSync('nsenter', ['-t', String(leader), '-a', 'sh', '-c', command], { encoding: 'utf8', timeout: timeoutMs })
    return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? String(r.error ?? '') }
  }
  const stop = async (): Promise<void> => {
    if (nspawn.exitCode !== null || nspawn.signalCode !== null) return
    nspawn.kill('SIGTERM') // nspawn asks the container's systemd to power off
    const timer = setTimeout(() => nspawn.kill('SIGKILL'), 30_000)
    await exited
    clearTimeout(timer)
  }
  const up = await waitFor(() => {
    leader = leader || childNamed(nspawn.pid!, 'systemd')
    return leader !== 0 && /^(running|degraded)/.test(sh('systemctl is-system-running', 5_000).stdout)
  }, 120_000)
  if (!up) {
    await stop()
    throw new Error(`the container's systemd did not come up within 120 s: ${stderr.trim()}`)
  }
  return { sh, stop }
}

/** The pid of `parent`'s child whose command name is `name`, or 0. */
function childNamed(parent: number, name: string): number {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8')
      const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
      if (ppid === parent && comm === name) return Number(entry)
    } catch {
      // gone
    }
  }
  return 0
}
