import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { chmodSync, copyFileSync, lutimesSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gzipSync } from 'node:zlib'
import { build } from 'esbuild'
import { ASSET_FILES, VERSION_ASSET } from '../src/assets.js'

/**
 * `npm run package [-- --out DIR]`: builds, from the compiled dist/ (npm run build runs first), into build/package/:
 * - `meliproxy-<version>-linux-x64`: a single executable (Node's single executable applications: an esbuild bundle
 *   of bin/meliproxy and everything it imports, the dashboard files and the version as assets, injected into a copy
 *   of the node binary that runs this script);
 * - `meliproxy_<version>_amd64.deb`: that executable as /usr/bin/meliproxy, the systemd unit, the config under
 *   /etc/meliproxy as conffiles, and the maintainer scripts of config/deb/;
 * - `SHA256SUMS` for both (`sha256sum -c SHA256SUMS`).
 * Needs dpkg-deb (Debian's dpkg) on the PATH; nothing is fetched.
 */

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2'

function fail(message: string): never {
  process.stderr.write(`meliproxy package: ${message}\n`)
  process.exit(1)
}

/** The environment of every command the build runs: the caller's NODE_OPTIONS (a test runner's loaders) left out. */
function buildEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra }
  delete env.NODE_OPTIONS
  return env
}

function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: buildEnv() })
}

function outDir(argv: string[]): string {
  const i = argv.indexOf('--out')
  if (i < 0) return join(ROOT, 'build/package')
  const dir = argv[i + 1]
  if (dir === undefined || dir === '') fail('--out needs a folder')
  return dir
}

/** A semver version as a Debian version: a pre-release sorts before its release (1.0.0-rc.1 -> 1.0.0~rc.1). */
function debianVersion(v: string): string {
  return v.replace('-', '~')
}

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex')
}

/** Bundles bin/meliproxy (the launcher every install runs) and all it imports into one CommonJS file. */
async function bundle(work: string): Promise<{ file: string; packages: Map<string, string> }> {
  const file = join(work, 'meliproxy.cjs')
  const launcher = readFileSync(join(ROOT, 'bin/meliproxy'), 'utf8').replace(/^#!.*\n/, '')
  const result = await build({
    stdin: { contents: launcher, resolveDir: join(ROOT, 'bin'), sourcefile: 'bin/meliproxy', loader: 'js' },
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    outfile: file,
    metafile: true,
    legalComments: 'eof',
    // src/assets.ts reads import.meta.url only outside the executable.
    logOverride: { 'empty-import-meta': 'silent' },
    logLevel: 'warning',
  })
  if (result.errors.length > 0) fail('the bundle failed')
  // The packages the bundle holds, for the copyright file.
  const packages = new Map<string, string>()
  for (const input of Object.keys(result.metafile.inputs)) {
    const m = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(input)
    if (m === null || packages.has(m[1]!)) continue
    const pkg = JSON.parse(readFileSync(join(ROOT, 'node_modules', m[1]!, 'package.json'), 'utf8')) as { version: string; license?: string }
    packages.set(m[1]!, `${pkg.version} (${pkg.license ?? 'see its package'})`)
  }
  return { file, packages }
}

/** Injects the bundle and its assets into a copy of this node binary. */
function executable(work: string, main: string, version: string, target: string): void {
  const versionFile = join(work, 'version')
  writeFileSync(versionFile, version + '\n')
  const assets: Record<string, string> = { [VERSION_ASSET]: versionFile }
  for (const [name, file] of Object.entries(ASSET_FILES)) assets[name] = join(ROOT, file)
  const blob = join(work, 'sea-prep.blob')
  const seaConfig = join(work, 'sea-config.json')
  writeFileSync(seaConfig, JSON.stringify({ main, output: blob, disableExperimentalSEAWarning: true, assets }, null, 2))
  run(process.execPath, ['--experimental-sea-config', seaConfig])
  copyFileSync(process.execPath, target)
  chmodSync(target, 0o755)
  // postject's "Can't find string offset for section name" warnings are harmless (Node's documentation).
  run(process.execPath, [join(ROOT, 'node_modules/postject/dist/cli.js'), target, 'NODE_SEA_BLOB', blob, '--sentinel-fuse', SEA_FUSE])
  const printed = run(target, ['--version']).trim()
  if (printed !== version) fail(`the executable printed version "${printed}", expected "${version}"`)
}

function place(from: string, to: string, mode: number): void {
  mkdirSync(join(to, '..'), { recursive: true })
  copyFileSync(from, to)
  chmodSync(to, mode)
}

function write(to: string, text: string | Buffer, mode: number): void {
  mkdirSync(join(to, '..'), { recursive: true })
  writeFileSync(to, text)
  chmodSync(to, mode)
}

/**
 * The time stamped on the package's files: SOURCE_DATE_EPOCH when set (reproducible-builds.org), else the last
 * commit's time, so two builds of one commit give the same package and the same checksum.
 */
function sourceDateEpoch(): number {
  const env = process.env.SOURCE_DATE_EPOCH
  if (env !== undefined && /^\d+$/.test(env)) return Number(env)
  try {
    return Number(run('git', ['log', '-1', '--format=%ct']).trim())
  } catch {
    return Math.floor(Date.now() / 1000)
  }
}

function stamp(dir: string, epoch: number): void {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name)
    if (statSync(path).isDirectory()) stamp(path, epoch)
    lutimesSync(path, epoch, epoch)
  }
  lutimesSync(dir, epoch, epoch)
}

function treeBytes(dir: string): number {
  let total = 0
  for (const name of readdirSync(dir)) {
    const path = join(dir, name)
    const st = statSync(path)
    total += st.isDirectory() ? treeBytes(path) : st.size
  }
  return total
}

/** The Debian package: files under a staging root, DEBIAN/ control files, then dpkg-deb owned by root. */
/**
 * The package's Depends, derived from what the executable links (node links the C and C++ runtimes) and the symbol
 * versions it uses, by dpkg-shlibdeps as a Debian package build does. It runs in a folder of its own with the
 * one-stanza debian/control it insists on reading.
 */
function shlibDepends(work: string, exe: string): string {
  const dir = join(work, 'shlibdeps')
  write(join(dir, 'debian/control'), 'Source: meliproxy\n\nPackage: meliproxy\nArchitecture: amd64\n', 0o644)
  symlinkSync(exe, join(dir, 'meliproxy'))
  let printed: string
  try {
    printed = execFileSync('dpkg-shlibdeps', ['-O', '-e', 'meliproxy'], { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: buildEnv() })
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string }
    if (e.code === 'ENOENT') fail('dpkg-shlibdeps is not installed (apt-get install dpkg-dev)')
    fail(`dpkg-shlibdeps failed: ${e.stderr ?? e.message}`)
  }
  const depends = /^shlibs:Depends=(.+)$/m.exec(printed)?.[1]?.trim()
  if (depends === undefined || depends === '') fail(`dpkg-shlibdeps printed no shlibs:Depends: ${printed}`)
  return depends
}

function debian(work: string, exe: string, version: string, packages: Map<string, string>, target: string): void {
  const root = join(work, 'deb')
  const doc = join(root, 'usr/share/doc/meliproxy')
  place(exe, join(root, 'usr/bin/meliproxy'), 0o755)
  place(join(ROOT, 'config/meliproxy.service'), join(root, 'lib/systemd/system/meliproxy.service'), 0o644)
  place(join(ROOT, 'config/meliproxy.example.yaml'), join(root, 'etc/meliproxy/meliproxy.yaml'), 0o644)
  // Secrets (the admin token, a Redis password) belong in the environment file: root only (systemd reads it).
  place(join(ROOT, 'config/meliproxy.env'), join(root, 'etc/meliproxy/meliproxy.env'), 0o600)
  place(join(ROOT, 'README.md'), join(doc, 'README.md'), 0o644)
  write(join(doc, 'changelog.gz'), gzipSync(readFileSync(join(ROOT, 'CHANGELOG.md')), { level: 9 }), 0o644)
  const bundled = [...packages].map(([name, v]) => ` ${name} ${v}`).join('\n')
  write(
    join(doc, 'copyright'),
    'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n' +
      'Upstream-Name: meliproxy\n\n' +
      'Files: *\nLicense: MIT\n\n' +
      'Comment: /usr/bin/meliproxy carries the Node.js runtime (' + process.version + ', MIT and the licenses of the\n' +
      ' libraries it bundles: https://github.com/nodejs/node/blob/main/LICENSE) and these npm packages:\n' +
      bundled + '\n',
    0o644,
  )
  // Two findings lintian makes of any Node.js single executable, and why they stand here: node links its own zlib
  // (the executable is a copy of the node binary), and stripping the copy would drop the symbols node's own
  // diagnostics use; the application is injected into it, not compiled.
  write(
    join(root, 'usr/share/lintian/overrides/meliproxy'),
    '# /usr/bin/meliproxy is the Node.js binary with the application injected (a single executable application).\n' +
      'meliproxy: embedded-library zlib [usr/bin/meliproxy]\n' +
      'meliproxy: unstripped-binary-or-object [usr/bin/meliproxy]\n',
    0o644,
  )
  for (const script of ['postinst', 'prerm', 'postrm']) place(join(ROOT, 'config/deb', script), join(root, 'DEBIAN', script), 0o755)
  write(join(root, 'DEBIAN/conffiles'), '/etc/meliproxy/meliproxy.yaml\n/etc/meliproxy/meliproxy.env\n', 0o644)
  const installedKb = Math.ceil(treeBytes(root) / 1024)
  write(
    join(root, 'DEBIAN/control'),
    [
      'Package: meliproxy',
      `Version: ${debianVersion(version)}`,
      'Architecture: amd64',
      `Maintainer: ${process.env.DEB_MAINTAINER ?? 'meliproxy maintainers <maintainers@meliproxy.invalid>'}`,
      `Installed-Size: ${installedKb}`,
      // The executable carries Node; node itself links the C and C++ runtimes.
      `Depends: ${shlibDepends(work, exe)}`,
      'Section: net',
      'Priority: optional',
      'Description: API proxy with fleet-wide rate limits, a shared cache and usage statistics',
      ' meliproxy forwards HTTP traffic to one upstream API, enforces exact rate limits across',
      ' every instance, caches responses in process and in Redis, and records usage statistics.',
      ' The package installs one executable (it carries its own Node.js), a hardened systemd unit',
      ' and its configuration under /etc/meliproxy.',
      '',
    ].join('\n'),
    0o644,
  )
  chmodSync(join(root, 'DEBIAN'), 0o755)
  const epoch = sourceDateEpoch()
  stamp(root, epoch)
  execFileSync('dpkg-deb', ['--root-owner-group', '-Zgzip', '--build', root, target], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: buildEnv({ SOURCE_DATE_EPOCH: String(epoch) }),
  })
}

async function main(): Promise<void> {
  if (process.platform !== 'linux' || process.arch !== 'x64') fail(`builds linux-x64 only, this is ${process.platform}-${process.arch}`)
  const version = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version
  const out = outDir(process.argv.slice(2))
  const work = join(out, 'work')
  rmSync(work, { recursive: true, force: true })
  mkdirSync(work, { recursive: true })
  const exe = join(out, `meliproxy-${version}-linux-x64`)
  const deb = join(out, `meliproxy_${debianVersion(version)}_amd64.deb`)
  rmSync(exe, { force: true })
  rmSync(deb, { force: true })

  const { file, packages } = await bundle(work)
  executable(work, file, version, exe)
  debian(work, exe, version, packages, deb)
  const sums = [exe, deb].map((f) => `${sha256(f)}  ${relative(out, f)}\n`).join('')
  writeFileSync(join(out, 'SHA256SUMS'), sums)
  rmSync(work, { recursive: true, force: true })
  process.stdout.write(
    `${exe} (${(statSync(exe).size / 1e6).toFixed(1)} MB)\n${deb} (${(statSync(deb).size / 1e6).toFixed(1)} MB)\n${join(out, 'SHA256SUMS')}\n`,
  )
}

main().catch((err: Error) => fail(err.message))
