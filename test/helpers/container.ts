import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs'
import { dirname } from 'node:path'
import { waitFor } from './meliproxy.js'

/**
 * A Debian system booted with its own systemd as PID 1 (systemd-nspawn --boot), to run the Debian package as a VM
 * does: dpkg installs it, systemd starts, reloads, restarts and stops it. The container shares this machine's network
 * (so a test reaches its ports on 127.0.0.1) and runs on a throw-away copy of the root file system (--ephemeral):
 * the prepared root stays clean for the next run. Commands run inside through nsenter.
 *
 * A container outlives nothing that booted it: systemd-nspawn gets SIGTERM (it powers the container off and deletes
 * the copy) when the test process dies, even by SIGKILL or tap's timeout, when no teardown runs; and a container that
 * does not power off is ended by killing its systemd, after which nspawn still deletes the copy. Killing nspawn itself
 * would leave the container running on this machine's network, and the copy on disk.
 */

/** The Debian root file system the tests boot: made by debootstrap in .ci/run (see README, "Two commands"). */
export const TEST_ROOTFS = process.env.MELIPROXY_TEST_ROOTFS ?? '/var/tmp/meliproxy-test-rootfs/debian'

/** Why a container cannot be booted here, or null when it can. */
export function containerUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'booting a container needs root'
  if (spawnSync('sh', ['-c', 'command -v systemd-nspawn && command -v nsenter && command -v setpriv']).status !== 0) {
    return 'systemd-nspawn, nsenter or setpriv is not installed (apt-get install systemd-container util-linux, as .ci/run does)'
  }
  if (!existsSync(`${TEST_ROOTFS}/usr/bin/systemctl`)) {
    return `no Debian root file system with systemd at ${TEST_ROOTFS} (.ci/run makes it with debootstrap)`
  }
  return null
}

export interface Container {
  /** Runs a shell command inside (as root); its exit status and output. */
  sh(command: string, timeoutMs?: number): { status: number | null; stdout: string; stderr: string }
  /**
   * Powers the container off and waits for it; after `graceMs` its systemd gets SIGKILL (the kernel ends everything
   * in the container with it), and only if nspawn is still there 30 s later does nspawn get SIGKILL.
   */
  stop(graceMs?: number): Promise<void>
  /** The container's systemd (its PID 1) as this machine numbers it. */
  readonly leader: number
  /** systemd-nspawn's pid. */
  readonly nspawn: number
  /** The throw-away copy of the root file system it runs on (deleted by nspawn when the container ends). */
  readonly copy: string
}

/** Boots the container with `binds` (host path -> path inside, read-only) and waits until its systemd is up. */
export async function bootContainer(binds: Record<string, string>): Promise<Container> {
  // setpriv: nspawn gets SIGTERM when this process dies without stopping it (PR_SET_PDEATHSIG, kept across exec).
  const nspawn: ChildProcess = spawn(
    'setpriv',
    ['--pdeathsig', 'SIGTERM', '--', 'systemd-nspawn', '--quiet', '--register=no', '--keep-unit', '--ephemeral', '--boot', '-D', TEST_ROOTFS,
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
  const stop = async (graceMs = 30_000): Promise<void> => {
    if (nspawn.exitCode !== null || nspawn.signalCode !== null) return
    nspawn.kill('SIGTERM') // nspawn asks the container's systemd to power off
    const timers = [
      setTimeout(() => {
        try {
          if (leader !== 0) process.kill(leader, 'SIGKILL')
          else nspawn.kill('SIGKILL')
        } catch {
          // gone already
        }
      }, graceMs),
      setTimeout(() => nspawn.kill('SIGKILL'), graceMs + 30_000),
    ]
    await exited
    for (const timer of timers) clearTimeout(timer)
  }
  const up = await waitFor(() => {
    leader = leader || childNamed(nspawn.pid!, 'systemd')
    return leader !== 0 && /^(running|degraded)/.test(sh('systemctl is-system-running', 5_000).stdout)
  }, 120_000)
  if (!up) {
    await stop()
    throw new Error(`the container's systemd did not come up within 120 s: ${stderr.trim()}`)
  }
  return { sh, stop, leader, nspawn: nspawn.pid!, copy: copyOf(nspawn.pid!) }
}

/** The copy nspawn --ephemeral made: it holds the copy's lock file (.#<copy>.lck) open beside the prepared root. */
function copyOf(nspawn: number): string {
  for (const fd of readdirSync(`/proc/${nspawn}/fd`)) {
    try {
      const m = /^(.*)\/\.#(\.#machine\.[^/]+)\.lck$/.exec(readlinkSync(`/proc/${nspawn}/fd/${fd}`, 'utf8'))
      if (m !== null && m[1] === dirname(TEST_ROOTFS)) return `${m[1]}/${m[2]}`
    } catch {
      // closed meanwhile
    }
  }
  return ''
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
