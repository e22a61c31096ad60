import { readFileSync } from 'node:fs'
import { getAsset, isSea } from 'node:sea'

/**
 * The files the program reads beside its code: the dashboard's files and the package's version. Run from the source
 * tree (bin/meliproxy) they are read from disk; in the single executable that `npm run package` builds they are
 * assets embedded at build time (node:sea), so the executable needs no file next to it.
 */

/** Each embedded asset and the file it is built from, relative to the package root (tools/package.ts embeds them). */
export const ASSET_FILES = {
  'dashboard/index.html': 'src/admin/dashboard/index.html',
  'dashboard/dashboard.js': 'src/admin/dashboard/dashboard.js',
  'dashboard/dashboard.css': 'src/admin/dashboard/dashboard.css',
} as const

/** The name of an embedded file. */
export type AssetName = keyof typeof ASSET_FILES

/** The asset holding the version in the executable (written by tools/package.ts from package.json). */
export const VERSION_ASSET = 'version'

/** The package root, from dist/assets.js (only read outside the executable, where import.meta.url is a file URL). */
const root = (): URL => new URL('../', import.meta.url)

/** The bytes of an embedded file. */
export function readAsset(name: AssetName): Buffer {
  if (isSea()) return Buffer.from(getAsset(name))
  return readFileSync(new URL(ASSET_FILES[name], root()))
}

/** The meliproxy version: the one built into the executable, or package.json's. */
export function version(): string {
  if (isSea()) return getAsset(VERSION_ASSET, 'utf8').trim()
  const pkg = JSON.parse(readFileSync(new URL('package.json', root()), 'utf8')) as { version: string }
  return pkg.version
}
