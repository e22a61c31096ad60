import { spawn, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer } from 'node:net'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { request } from 'undici'
import { OPENAPI } from '../../src/admin/openapi.js'
import { closeAgents, send } from '../helpers/client.js'
import { admin, alive, runBinary, startMeliproxy, waitFor, type RunningProxy } from '../helpers/meliproxy.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'
import { bootContainer, containerUnavailable } from '../helpers/container.js'
import { freePort } from '../helpers/ports.js'

/**
 * `npm run package` as an operator meets it: the build writes the single executable, the Debian package and their
 * checksums; the package holds the files, conffiles and dependencies it states; the executable extracted from the
 * package (`dpkg-deb -x`) runs with the packaged config like bin/meliproxy (a proxied request, workers forked from
 * the executable itself, the embedded dashboard and OpenAPI document, --version, a reload on SIGHUP); and
 * `systemd-analyze verify` accepts the packaged unit.
 */

// The build (a bundle, a 100 MB executable, a compressed package) takes a minute or two on a busy machine.
t.setTimeout(600_000)

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const PACKAGER = join(ROOT, 'build/tools/package.js')
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version
const EXE_NAME = `meliproxy-${VERSION}-linux-x64`
const DEB_NAME = `meliproxy_${VERSION.replace('-', '~')}_amd64.deb`

function run(cmd: string, args: string[], timeoutMs = 60_000): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 })
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? (r.error ? String(r.error) : '') }
}

let out = ''
let exe = ''
let deb = ''
/** Where the package is extracted: its files as they land on a VM, under this folder. */
let root = ''
let installedBin = ''
let installedConfig = ''

const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex')

/** Whether a test container is gone: its systemd, its nspawn and its throw-away copy of the root file system. */
const containerGone = (c: { leader: number; nspawn: number; copy: string }) => (): boolean => !alive(c.leader) && !alive(c.nspawn) && !existsSync(c.copy)

/** A port below 1024 nothing listens on here (the container shares this machine's network), or 0. */
async function freeLowPort(): Promise<number> {
  for (let port = 1023; port >= 1000; port--) {
    const free = await new Promise<boolean>((resolve) => {
      const server = createServer().once('error', () => resolve(false))
      server.listen(port, '0.0.0.0', () => server.close(() => resolve(true)))
    })
    if (free) return port
  }
  return 0
}

// .ci/run installs dpkg and dpkg-dev, so CI always runs this file; elsewhere it says why it did not run.
if (run('sh', ['-c', 'command -v dpkg-deb && command -v dpkg-shlibdeps']).status === 0) register()
else t.plan(0, 'dpkg-deb or dpkg-shlibdeps is not installed (apt-get install dpkg dpkg-dev, as .ci/run does)')

function register(): void {
  t.before(() => {
    out = mkdtempSync(join(tmpdir(), 'meliproxy-package-'))
    exe = join(out, EXE_NAME)
    deb = join(out, DEB_NAME)
    root = join(out, 'root')
    installedBin = join(root, 'usr/bin/meliproxy')
    installedConfig = join(root, 'etc/meliproxy/meliproxy.yaml')
    t.ok(existsSync(PACKAGER), 'the packager is compiled (npm test runs tsc -p tools/tsconfig.json first)')
    const built = run(process.execPath, [PACKAGER, '--out', out], 540_000)
    if (built.status !== 0) throw new Error(`npm run package failed (${built.status}):\n${built.stderr}`)
    mkdirSync(root)
    const x = run('dpkg-deb', ['-x', deb, root])
    if (x.status !== 0) throw new Error(`dpkg-deb -x failed: ${x.stderr}`)
  })

  t.teardown(() => {
    if (out !== '') rmSync(out, { recursive: true, force: true })
  })

  t.test('the build writes the executable, the package and a SHA256SUMS file that checks both', async (t) => {
    t.ok(statSync(exe).mode & 0o100, `${EXE_NAME} is executable`)
    t.ok(statSync(deb).size > 0, `${DEB_NAME} is written`)
    const sums = readFileSync(join(out, 'SHA256SUMS'), 'utf8')
    t.same(sums.trim().split('\n').sort(), [`${sha256(deb)}  ${DEB_NAME}`, `${sha256(exe)}  ${EXE_NAME}`].sort())
    const check = spawnSync('sha256sum', ['-c', 'SHA256SUMS'], { cwd: out, encoding: 'utf8' })
    t.equal(check.status, 0, `sha256sum -c accepts it: ${check.stdout.trim()}`)
    t.equal(sha256(installedBin), sha256(exe), '/usr/bin/meliproxy in the package is that executable')
  })

  t.test('dpkg-deb lists the package fields, its conffiles and its files with their owners and modes', async (t) => {
    const field = (name: string): string => run('dpkg-deb', ['--field', deb, name]).stdout.trim()
    t.equal(field('Package'), 'meliproxy')
    t.equal(field('Version'), VERSION.replace('-', '~'))
    t.equal(field('Architecture'), 'amd64')
    // The executable carries Node; what it links is the C and C++ runtime, with the versions its symbols need.
    const depends = field('Depends').split(',').map((d) => /^(\S+)(?: \((>=) (\S+)\))?$/.exec(d.trim()))
    t.same(depends.map((d) => d?.[1]), ['libc6', 'libgcc-s1', 'libstdc++6'], `depends on the C and C++ runtimes only: ${field('Depends')}`)
    const libc = depends.find((d) => d?.[1] === 'libc6')?.[3] ?? '0'
    // The glibc symbol versions node uses: the libc6 it depends on must provide the newest of them.
    const glibcUsed = new Set([...run('objdump', ['-T', installedBin]).stdout.matchAll(/GLIBC_(\d+(?:\.\d+)+)/g)].map((m) => m[1]!))
    const parts = (v: string) => v.split('.').map(Number)
    const newer = (a: string, b: string) => parts(a)[0]! - parts(b)[0]! || (parts(a)[1] ?? 0) - (parts(b)[1] ?? 0)
    const newest = [...glibcUsed].sort((a, b) => newer(b, a))[0]
    t.ok(newest !== undefined, 'objdump lists the glibc symbol versions the executable uses')
    t.equal(run('dpkg', ['--compare-versions', libc, 'ge', newest ?? '99']).status, 0, `libc6 (>= ${libc}) provides GLIBC_${newest}, the newest the executable uses`)
    for (const d of depends) {
      const installed = run('dpkg-query', ['-W', '-f', '${Version}', d?.[1] ?? '-']).stdout
      const wanted = d?.[3] ?? '0'
      t.equal(run('dpkg', ['--compare-versions', installed, 'ge', wanted]).status, 0, `${d?.[1]} ${installed} is installed here and satisfies >= ${wanted}`)
    }

    const conffiles = run('dpkg-deb', ['--info', deb, 'conffiles']).stdout.trim().split('\n')
    t.same(conffiles, ['/etc/meliproxy/meliproxy.yaml', '/etc/meliproxy/meliproxy.env'])

    const contents = run('dpkg-deb', ['--contents', deb]).stdout
    const entry = (path: string): string => contents.split('\n').find((l) => l.endsWith(` ${path}`)) ?? `${path} missing`
    t.match(entry('./usr/bin/meliproxy'), /^-rwxr-xr-x root\/root /)
    t.match(entry('./lib/systemd/system/meliproxy.service'), /^-rw-r--r-- root\/root /)
    t.match(entry('./etc/meliproxy/meliproxy.yaml'), /^-rw-r--r-- root\/root /)
    t.match(entry('./etc/meliproxy/meliproxy.env'), /^-rw------- root\/root /, 'the environment file (secrets) is root-only')
    t.match(entry('./usr/share/doc/meliproxy/copyright'), /^-rw-r--r-- root\/root /)

    const unit = readFileSync(join(root, 'lib/systemd/system/meliproxy.service'), 'utf8')
    t.equal(unit, readFileSync(join(ROOT, 'config/meliproxy.service'), 'utf8'), 'the unit is config/meliproxy.service')
    t.match(unit, /^ExecStart=\/usr\/bin\/meliproxy --config \/etc\/meliproxy\/meliproxy\.yaml$/m)
    t.match(unit, /^EnvironmentFile=-\/etc\/meliproxy\/meliproxy\.env$/m)
    t.match(unit, /^User=meliproxy$/m)
    t.equal(readFileSync(installedConfig, 'utf8'), readFileSync(join(ROOT, 'config/meliproxy.example.yaml'), 'utf8'))
    const env = readFileSync(join(root, 'etc/meliproxy/meliproxy.env'), 'utf8')
    t.same(env.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('#')), [], 'the shipped environment file sets nothing')
  })

  t.test('the maintainer scripts: a system user, the unit enabled and (re)started the Debian way, stopped on remove, /etc/meliproxy gone on purge', async (t) => {
    const control = join(out, 'control')
    t.equal(run('dpkg-deb', ['-e', deb, control]).status, 0)
    const script = (name: string): string => {
      const path = join(control, name)
      t.ok(statSync(path).mode & 0o100, `${name} is executable`)
      t.equal(run('sh', ['-n', path]).status, 0, `${name} parses as sh`)
      return readFileSync(path, 'utf8')
    }
    const postinst = script('postinst')
    t.match(postinst, /getent passwd meliproxy/, 'the user is created only when missing')
    t.match(postinst, /adduser --system --group/)
    t.match(postinst, /useradd --system/, 'useradd where adduser is absent')
    t.match(postinst, /deb-systemd-helper enable meliproxy\.service/)
    t.match(postinst, /if \[ -d \/run\/systemd\/system \]; then/, 'start only where systemd runs')
    t.match(postinst, /if \[ -n "\$2" \]; then action=restart; else action=start; fi/, 'restart on upgrade')
    t.match(postinst, /deb-systemd-invoke "\$action" meliproxy\.service/)
    const prerm = script('prerm')
    t.match(prerm, /"\$1" = remove .*\n\s*deb-systemd-invoke stop meliproxy\.service/)
    const postrm = script('postrm')
    t.match(postrm, /if \[ "\$1" = purge \]; then[\s\S]*deb-systemd-helper purge meliproxy\.service/)
    t.notMatch(postrm, /rm -r/, 'purge leaves /etc/meliproxy to dpkg (its conffiles only)')
    t.notMatch(postrm, /deluser|userdel/, 'the system user stays on purge')
  })

  t.test('the extracted executable answers --version and refuses a bad flag like bin/meliproxy', async (t) => {
    const v = await runBinary(['--version'], {}, installedBin)
    t.equal(v.code, 0)
    t.equal(v.stdout.trim(), VERSION, 'the version built in')
    const bad = await runBinary(['--port', 'abc'], {}, installedBin)
    t.equal(bad.code, 2)
    t.match(bad.stderr, /^meliproxy: --port: "abc" is not a port/)
    t.equal(bad.stderr.trim().split('\n').length, 1, 'one line')
    const help = await runBinary(['--help'], {}, installedBin)
    const sourceHelp = await runBinary(['--help'], {})
    t.equal(help.code, 0)
    t.equal(help.stdout, sourceHelp.stdout, '--help prints what bin/meliproxy prints: every flag')
  })

  t.test('the extracted executable serves with the packaged config, forks its workers from itself and reloads on SIGHUP', async (t) => {
    let upstream: TestUpstream | undefined
    let proxy: RunningProxy | undefined
    t.teardown(async () => {
      await proxy?.stop()
      await closeAgents()
      await upstream?.close()
    })
    upstream = await startUpstream()
    upstream.route('/categories', (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end('{"id":"MLA1"}')
    })
    // The packaged file as is; the flags move it to free loopback ports and the test upstream (flag > file).
    proxy = await startMeliproxy(['--config', installedConfig, '--upstream', upstream.url], { executable: installedBin, workers: 2 })

    const got = await send(`${proxy.url}/echo/hello`)
    t.equal(got.status, 200)
    t.equal(JSON.parse(got.body).url, '/echo/hello', 'the upstream answered the proxied request')
    t.equal(upstream.hits('/echo/hello'), 1)

    const workers = proxy.workerPids()
    t.equal(workers.length, 2, 'two workers are children of the primary')
    for (const pid of workers) t.equal(readlinkSync(`/proc/${pid}/exe`), realpathSync(installedBin), `worker ${pid} runs the executable itself`)
    const status = await admin(proxy, '/api/status')
    t.equal(status.body.version, VERSION)
    t.same([...status.body.workers.pids].sort(), [...workers].sort())
    t.equal(status.body.redis.configured, false, 'as shipped: no Redis')

    // Every file of the source tree's dashboard folder, so a file added there but not embedded fails here.
    const types: Record<string, string> = { html: 'text/html; charset=utf-8', js: 'text/javascript; charset=utf-8', css: 'text/css; charset=utf-8' }
    const dashboard = join(ROOT, 'src/admin/dashboard')
    for (const file of readdirSync(dashboard)) {
      const path = file === 'index.html' ? '/' : `/${file}`
      const res = await request(proxy.adminUrl + path)
      const body = Buffer.from(await res.body.arrayBuffer())
      t.equal(res.statusCode, 200, `${path} (${file}) is served from the embedded assets`)
      t.equal(res.headers['content-type'], types[file.split('.').pop()!] ?? `a content type for ${file}`, `${path}: its content type`)
      t.ok(body.equals(readFileSync(join(dashboard, file))), `${path}: the bytes of src/admin/dashboard/${file}`)
    }
    const openapi = await admin(proxy, '/api/openapi.json')
    t.equal(openapi.status, 200)
    t.same(openapi.body, JSON.parse(JSON.stringify(OPENAPI)), "/api/openapi.json is the source tree's document")

    // SIGHUP: the edited file's rule is enforced by new workers. The packaged "categories" rule allows 10000 a minute.
    for (let i = 0; i < 3; i++) t.equal((await send(`${proxy.url}/categories/MLA1`)).status, 200, 'under the packaged limit')
    const text = readFileSync(installedConfig, 'utf8')
    const edited = text.replace(/(name: categories\n\s+match: \{ path: \/categories\/\* \}\n\s+limit:) 10000/, '$1 1')
    t.not(edited, text, 'the rule is edited')
    writeFileSync(installedConfig, edited)
    proxy.proc.kill('SIGHUP')
    const reloaded = await waitFor(() => proxy!.stderr.some((l) => l.includes('"reload complete"')), 30_000)
    t.ok(reloaded, 'the primary logs the reload as complete')
    // The old workers drain and exit once their replacements listen.
    const replaced = await waitFor(() => {
      const now = proxy!.workerPids()
      return now.length === 2 && now.every((p) => !workers.includes(p))
    }, 30_000)
    t.ok(replaced, `both workers replaced by two new ones (${proxy.workerPids().join(', ')}, before ${workers.join(', ')})`)
    // A fixed window of a minute: of a few requests in a row, at least the second in one window is refused.
    let refused = 0
    for (let i = 0; i < 5 && refused === 0; i++) if ((await send(`${proxy.url}/categories/MLA1`)).status === 429) refused++
    t.equal(refused, 1, 'the reloaded limit of 1 a minute refuses a request')
  })

  // Installing for real changes this machine (a package, a system user): only as root, and only where meliproxy is not
  // installed already; everything but what Debian keeps on purge is removed afterwards.
  const installSkip =
    process.getuid?.() !== 0
      ? 'installing with dpkg needs root (this check runs as root in CI)'
      : run('dpkg-query', ['-W', 'meliproxy']).status === 0 || existsSync('/usr/bin/meliproxy') || existsSync('/etc/meliproxy')
        ? 'meliproxy is already installed on this machine; not touching it'
        : false

  t.test('installed with dpkg: a system user and the unit enabled; an upgrade keeps an edited config; remove keeps /etc/meliproxy, purge deletes it and keeps the user', { skip: installSkip }, async (t) => {
    const userBefore = run('getent', ['passwd', 'meliproxy']).status === 0
    const wants = '/etc/systemd/system/multi-user.target.wants/meliproxy.service'
    const helper = run('sh', ['-c', 'command -v deb-systemd-helper']).status === 0
    t.teardown(() => {
      if (run('dpkg-query', ['-W', 'meliproxy']).status === 0) run('dpkg', ['--purge', 'meliproxy'])
      // /etc/meliproxy did not exist before (installSkip): what is left is the test's own file.
      rmSync('/etc/meliproxy', { recursive: true, force: true })
      if (!userBefore) run('userdel', ['meliproxy'])
    })
    const install = run('dpkg', ['--install', deb], 120_000)
    t.equal(install.status, 0, `dpkg --install: ${install.stderr.trim()}`)
    t.equal(sha256('/usr/bin/meliproxy'), sha256(exe), '/usr/bin/meliproxy installed')
    t.equal(run('/usr/bin/meliproxy', ['--version']).stdout.trim(), VERSION)
    t.ok(existsSync('/lib/systemd/system/meliproxy.service'), 'the unit installed')
    const user = run('getent', ['passwd', 'meliproxy']).stdout.trim().split(':')
    t.equal(user[0], 'meliproxy', 'the meliproxy user exists')
    t.ok(Number(user[2]) < 1000, `a system user (uid ${user[2]})`)
    t.match(user[6] ?? '', /nologin$/, 'no login shell')
    if (helper) t.ok(existsSync(wants), 'deb-systemd-helper enabled the unit (multi-user.target.wants)')
    t.equal(run('dpkg-query', ['-W', '-f', '${Status}', 'meliproxy']).stdout, 'install ok installed')

    // An upgrade (the same package again: postinst runs with the installed version) keeps the edited conffile.
    writeFileSync('/etc/meliproxy/meliproxy.yaml', readFileSync('/etc/meliproxy/meliproxy.yaml', 'utf8') + '# edited by the operator\n')
    const again = run('dpkg', ['--install', deb], 120_000)
    t.equal(again.status, 0, `dpkg --install over itself: ${again.stderr.trim()}`)
    t.match(readFileSync('/etc/meliproxy/meliproxy.yaml', 'utf8'), /# edited by the operator\n$/, 'the edited config is kept')

    const remove = run('dpkg', ['--remove', 'meliproxy'], 120_000)
    t.equal(remove.status, 0, `dpkg --remove: ${remove.stderr.trim()}`)
    t.notOk(existsSync('/usr/bin/meliproxy'), 'remove: the executable is gone')
    t.notOk(existsSync('/lib/systemd/system/meliproxy.service'), 'remove: the unit is gone')
    t.ok(existsSync('/etc/meliproxy/meliproxy.yaml'), 'remove: the config stays')

    // A file the operator put beside the config (a certificate) is not the package's to delete.
    writeFileSync('/etc/meliproxy/redis-ca.pem', 'operator file\n')
    const purge = run('dpkg', ['--purge', 'meliproxy'], 120_000)
    t.equal(purge.status, 0, `dpkg --purge: ${purge.stderr.trim()}`)
    t.notOk(existsSync('/etc/meliproxy/meliproxy.yaml'), 'purge: the config is gone')
    t.notOk(existsSync('/etc/meliproxy/meliproxy.env'), 'purge: the environment file is gone')
    t.same(readdirSync('/etc/meliproxy'), ['redis-ca.pem'], "purge: the operator's own file stays, nothing else")
    if (helper) t.notOk(existsSync(wants), 'purge: the enablement is gone')
    t.equal(run('getent', ['passwd', 'meliproxy']).status, 0, 'purge: the system user stays')
  })

  const analyze = run('systemd-analyze', ['--version'])
  const analyzeSkip = analyze.status === 0 ? false : `systemd-analyze cannot run here (${analyze.stderr.trim() || 'not installed: apt-get install systemd, as .ci/run does'})`

  t.test('systemd-analyze verify accepts the packaged unit', { skip: analyzeSkip }, async (t) => {
    // Verify in the extracted root: the ExecStart binary is the extracted one; the root gets the targets the unit
    // names and /bin/sh (ExecReload) from this machine.
    cpSync('/usr/lib/systemd/system', join(root, 'usr/lib/systemd/system'), { recursive: true, dereference: false })
    mkdirSync(join(root, 'bin'), { recursive: true })
    cpSync('/bin/sh', join(root, 'bin/sh'), { dereference: true })
    const ok = run('systemd-analyze', ['verify', `--root=${root}`, '/lib/systemd/system/meliproxy.service'])
    t.equal(ok.status, 0, 'exit 0')
    t.equal(ok.stderr.trim(), '', 'no warning')
    // The same check refuses a unit whose ExecStart does not exist, so the pass above means something.
    const broken = readFileSync(join(root, 'lib/systemd/system/meliproxy.service'), 'utf8').replace('ExecStart=/usr/bin/meliproxy', 'ExecStart=/usr/bin/meliproxy-missing')
    writeFileSync(join(root, 'lib/systemd/system/meliproxy-broken.service'), broken)
    const bad = run('systemd-analyze', ['verify', `--root=${root}`, '/lib/systemd/system/meliproxy-broken.service'])
    t.not(bad.status, 0, 'a missing ExecStart binary fails the check')
  })

  t.test('under a live systemd (a Debian container booted with systemd-nspawn): install, serve, reload, restart after a crash, no restart loop on a config error, a port below 1024 only with the capability, stop, purge; then the container ends though its power-off hangs', { skip: containerUnavailable() ?? false }, async (t) => {
    const upstream = await startUpstream()
    t.teardown(() => upstream.close())
    const [port, adminPort] = [await freePort(), await freePort()]
    const box = await bootContainer({ [deb]: '/root/meliproxy.deb' })
    t.teardown(() => box.stop())
    const sh = (command: string) => box.sh(command)
    const show = (props: string): Record<string, string> =>
      Object.fromEntries(sh(`systemctl show meliproxy -p ${props}`).stdout.trim().split('\n').map((l) => l.split('=', 2) as [string, string]))
    const journal = () => sh('journalctl -u meliproxy --no-pager -o cat').stdout
    t.comment(`container: ${sh('systemctl --version').stdout.split('\n')[0]}`)

    // As configuration management does: the environment file first, then the package (which keeps it).
    const env = [`MELIPROXY_UPSTREAM=${upstream.url}`, `MELIPROXY_PORT=${port}`, `MELIPROXY_ADMIN_PORT=${adminPort}`, 'MELIPROXY_WORKERS=2'].join('\n')
    t.equal(sh(`mkdir -p /etc/meliproxy && printf '%s\\n' '${env.replaceAll('\n', "' '")}' > /etc/meliproxy/meliproxy.env`).status, 0)
    const install = sh('DEBIAN_FRONTEND=noninteractive dpkg --force-confold -i /root/meliproxy.deb')
    t.equal(install.status, 0, `dpkg -i in the container: ${install.stderr.trim()}`)
    t.ok(await waitFor(() => sh('systemctl is-active meliproxy').stdout.trim() === 'active', 30_000), 'systemd started the unit')
    const served = async () => (await send(`http://127.0.0.1:${port}/echo/under-systemd`).catch(() => ({ status: 0 }))).status === 200
    t.ok(await waitFor(served, 30_000), 'it proxies a request to the upstream')
    t.equal(show('User').User, 'meliproxy')
    const status = (await (await request(`http://127.0.0.1:${adminPort}/api/status`)).body.json()) as { workers?: { listening?: number } }
    t.equal(status.workers?.listening, 2, 'two workers listen')

    // systemctl reload: SIGHUP through ExecReload; the primary stays, the workers are replaced.
    const pid = show('MainPID').MainPID
    const reload = sh('systemctl reload meliproxy')
    t.equal(reload.status, 0, `systemctl reload: ${reload.stderr.trim()}`)
    t.ok(await waitFor(() => journal().includes('"reload complete"'), 30_000), 'the primary reloaded')
    t.equal(show('MainPID').MainPID, pid, 'same primary')

    // The primary killed: systemd starts it again (Restart=always).
    t.equal(sh(`kill -9 ${pid}`).status, 0)
    t.ok(await waitFor(() => show('NRestarts').NRestarts === '1' && sh('systemctl is-active meliproxy').stdout.trim() === 'active', 30_000), 'restarted once')
    t.not(show('MainPID').MainPID, pid, 'a new primary')
    t.ok(await waitFor(served, 30_000), 'and serving again')

    // A configuration error exits 2: systemd does not restart it in a loop (RestartPreventExitStatus=2).
    sh("echo 'MELIPROXY_WORKERS=abc' >> /etc/meliproxy/meliproxy.env")
    sh('systemctl restart meliproxy')
    t.ok(await waitFor(() => show('ActiveState').ActiveState === 'failed', 30_000), 'the unit failed')
    await new Promise((r) => setTimeout(r, 3_000)) // three times RestartSec
    const failed = show('ActiveState,ExecMainStatus,NRestarts')
    t.same(failed, { ActiveState: 'failed', ExecMainStatus: '2', NRestarts: '0' }, 'exit 2, not restarted')
    t.match(journal(), /MELIPROXY_WORKERS: "abc" is not a worker count/, 'the journal names the field')
    // Lines carry their priority to journald: errors are found by priority, info lines are not, and no <N> shows.
    const errors = sh('journalctl -u meliproxy -p err -o cat --no-pager').stdout
    t.match(errors, /^meliproxy: MELIPROXY_WORKERS: "abc" is not a worker count/m, 'journalctl -p err finds the configuration error')
    t.notMatch(errors, /"msg":"meliproxy started"/, 'and not the info lines')
    t.match(sh('journalctl -u meliproxy -p info -o cat --no-pager').stdout, /^\{"time":"[^"]+","level":"info","msg":"meliproxy started"/m, 'an info line is plain JSON in the journal')

    // Fixed, started, stopped: the drain ends it cleanly.
    sh("sed -i '/MELIPROXY_WORKERS=abc/d' /etc/meliproxy/meliproxy.env && systemctl reset-failed meliproxy && systemctl start meliproxy")
    t.ok(await waitFor(served, 30_000), 'serving after the fix')

    // A port below 1024: the unit holds no capability, so it cannot be bound. The primary says so and exits 2 before
    // starting any worker; systemd does not restart it in a loop; the drop-in README.md gives lets it bind.
    const low = await freeLowPort()
    if (low === 0) t.comment('no free port below 1024 on this machine: the privileged-port check is left out')
    else {
      const ready = async () => (await request(`http://127.0.0.1:${adminPort}/readyz`).then((r) => r.body.dump().then(() => r.statusCode)).catch(() => 0))
      const restartsBefore = show('NRestarts').NRestarts
      sh(`echo 'MELIPROXY_PORT=${low}' >> /etc/meliproxy/meliproxy.env && systemctl restart meliproxy`)
      t.ok(await waitFor(() => show('ActiveState').ActiveState === 'failed', 30_000), 'the unit failed')
      t.match(journal(), new RegExp(`meliproxy: --port: cannot listen on 0\\.0\\.0\\.0:${low}: permission denied \\(EACCES`), 'the journal names the flag and why')
      await new Promise((r) => setTimeout(r, 3_000)) // three times RestartSec
      t.same(show('ExecMainStatus,NRestarts'), { ExecMainStatus: '2', NRestarts: restartsBefore }, 'exit 2, not restarted')
      sh(`systemctl reset-failed meliproxy && mkdir -p /etc/systemd/system/meliproxy.service.d && printf '[Service]\\nAmbientCapabilities=CAP_NET_BIND_SERVICE\\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\\n' > /etc/systemd/system/meliproxy.service.d/port.conf && systemctl daemon-reload && systemctl restart meliproxy`)
      t.ok(await waitFor(async () => (await send(`http://127.0.0.1:${low}/echo/low-port`).catch(() => ({ status: 0 }))).status === 200, 30_000), `with the drop-in it serves on port ${low}`)
      t.equal(await ready(), 200, '/readyz is 200')
      sh(`rm -r /etc/systemd/system/meliproxy.service.d && sed -i '/MELIPROXY_PORT=${low}/d' /etc/meliproxy/meliproxy.env && systemctl daemon-reload && systemctl restart meliproxy`)
      t.ok(await waitFor(served, 30_000), 'back on its own port')
    }

    t.equal(sh('systemctl stop meliproxy').status, 0)
    t.same(show('ActiveState,Result'), { ActiveState: 'inactive', Result: 'success' }, 'stopped cleanly')
    t.ok(journal().includes('"stopped"'), 'the primary logged its stop')

    const exposure = /Overall exposure level for meliproxy\.service: ([\d.]+)/.exec(sh('systemd-analyze security meliproxy --no-pager').stdout)
    t.ok(exposure !== null && Number(exposure[1]) <= 4, `systemd-analyze security: exposure ${exposure?.[1]} (OK is below 5)`)

    const purge = sh('dpkg --purge meliproxy')
    t.equal(purge.status, 0, `dpkg --purge: ${purge.stderr.trim()}`)
    t.equal(sh('test -e /lib/systemd/system/meliproxy.service || test -e /etc/meliproxy').status, 1, 'the unit and /etc/meliproxy are gone')
    t.equal(sh('getent passwd meliproxy').status, 0, 'the system user stays')

    // The container goes with its test even when its power-off hangs (a unit that ignores its stop signal, with no
    // stop timeout): stop() kills its systemd after the grace, and nspawn still deletes the copy.
    const stubborn = sh('systemd-run --unit=stubborn -p KillSignal=SIGCONT -p SendSIGKILL=no -p TimeoutStopSec=infinity sleep infinity')
    t.equal(stubborn.status, 0, `a unit that will not stop: ${stubborn.stderr.trim()}`)
    await box.stop(5_000)
    t.ok(await waitFor(containerGone(box), 60_000), 'stop() ends a container whose power-off hangs: its systemd killed, nspawn exited, the copy deleted')
  })

  t.test('the test container goes with its test: the process that booted it killed, the container powers off and its copy is deleted', { skip: containerUnavailable() ?? false }, async (t) => {

    // A test process killed with no teardown run (SIGKILL; tap's timeout is SIGALRM then SIGKILL).
    const helper = new URL('../helpers/container.js', import.meta.url).href
    const child = spawn(
      process.execPath,
      [...process.execArgv, '--input-type=module', '-e',
        `const box = await (await import(${JSON.stringify(helper)})).bootContainer({}); ` +
        'console.log(JSON.stringify({ leader: box.leader, nspawn: box.nspawn, copy: box.copy })); setInterval(() => {}, 60_000)'],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    )
    let line = ''
    child.stdout!.on('data', (c: Buffer) => (line += c.toString()))
    t.teardown(() => {
      child.kill('SIGKILL')
    })
    t.ok(await waitFor(() => line.includes('\n'), 180_000), `a child process booted a container: ${line.trim()}`)
    const first = JSON.parse(line) as { leader: number; nspawn: number; copy: string }
    t.teardown(() => {
      if (alive(first.leader)) process.kill(first.leader, 'SIGKILL') // nspawn then deletes the copy
    })
    t.ok(first.leader > 0 && alive(first.leader) && existsSync(first.copy), `its systemd ${first.leader} runs on the copy ${first.copy}`)
    child.kill('SIGKILL')
    t.ok(await waitFor(containerGone(first), 120_000), 'once it is killed: the container, nspawn and the copy are gone')
  })

  const lintianSkip = run('sh', ['-c', 'command -v lintian']).status === 0 ? false : 'lintian is not installed on this machine (apt-get install lintian to run this check)'

  t.test('lintian finds no error in the package', { skip: lintianSkip }, async (t) => {
    const l = run('lintian', ['--fail-on', 'error', deb], 300_000)
    t.equal(l.status, 0, l.stdout)
  })
}
