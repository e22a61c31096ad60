import { readdirSync, readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { ASSET_FILES, readAsset, type AssetName } from '../../src/assets.js'

/**
 * The single executable carries only the files ASSET_FILES lists (tools/package.ts embeds them): a file added to the
 * dashboard folder but not listed there would be served from the source tree and missing from the executable.
 */

const ROOT = fileURLToPath(new URL('../../', import.meta.url))

t.test('ASSET_FILES lists every file of src/admin/dashboard, and nothing else', async (t) => {
  const listed = Object.values(ASSET_FILES).map((f) => f.replace(/^src\/admin\/dashboard\//, '')).sort()
  t.same(listed, readdirSync(`${ROOT}src/admin/dashboard`).sort())
})

t.test('readAsset outside the executable reads the listed file', async (t) => {
  for (const [name, file] of Object.entries(ASSET_FILES)) {
    t.ok(readAsset(name as AssetName).equals(readFileSync(`${ROOT}${file}`)), name)
  }
})
