import { readdirSync, readFileSync, statSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import t from 'tap'

/**
 * The import graph of src/ (type imports included): no cycle anywhere, and the ground modules (errors, log, values,
 * net, metrics) import nothing of meliproxy's but each other.
 */

const SRC = fileURLToPath(new URL('../../src/', import.meta.url))
const GROUND = ['errors.ts', 'log.ts', 'values.ts', 'metrics.ts', 'net/ip.ts', 'net/client-ip.ts']

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name)
    if (statSync(path).isDirectory()) return sources(path)
    return path.endsWith('.ts') ? [path] : []
  })
}

/** Every module of src/ and the modules of src/ it imports (relative specifiers, `.js` mapped to `.ts`). */
function graph(): Map<string, string[]> {
  const g = new Map<string, string[]>()
  for (const file of sources(SRC)) {
    const text = readFileSync(file, 'utf8')
    const deps = [...text.matchAll(/^(?:import|export)\b[^'"]*?from\s+'(\.{1,2}\/[^']+)'/gm)].map((m) => resolve(dirname(file), m[1]!.replace(/\.js$/, '.ts')))
    g.set(relative(SRC, file), deps.map((d) => relative(SRC, d)))
  }
  return g
}

/** The strongly connected components with more than one module, or a module importing itself (Tarjan). */
function cycles(g: Map<string, string[]>): string[][] {
  let next = 0
  const index = new Map<string, number>()
  const low = new Map<string, number>()
  const stack: string[] = []
  const onStack = new Set<string>()
  const found: string[][] = []
  const visit = (v: string): void => {
    index.set(v, next)
    low.set(v, next++)
    stack.push(v)
    onStack.add(v)
    for (const w of g.get(v) ?? []) {
      if (!g.has(w)) continue
      if (!index.has(w)) {
        visit(w)
        low.set(v, Math.min(low.get(v)!, low.get(w)!))
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!))
    }
    if (low.get(v) === index.get(v)) {
      const scc: string[] = []
      let w: string
      do {
        w = stack.pop()!
        onStack.delete(w)
        scc.push(w)
      } while (w !== v)
      if (scc.length > 1 || (g.get(v) ?? []).includes(v)) found.push(scc.sort())
    }
  }
  for (const v of g.keys()) if (!index.has(v)) visit(v)
  return found
}

t.test('src/ has no import cycle, type imports included', async (t) => {
  const g = graph()
  t.ok(g.size > 50, `${g.size} modules read`)
  t.same(cycles(g), [])
})

t.test('ground modules import nothing of meliproxy but other ground modules', async (t) => {
  const g = graph()
  for (const m of GROUND) {
    t.ok(g.has(m), `${m} exists`)
    t.same((g.get(m) ?? []).filter((d) => !GROUND.includes(d)), [], `${m} imports no domain`)
  }
})

t.test('the checker finds a cycle when there is one', async (t) => {
  const g = new Map([
    ['a.ts', ['b.ts']],
    ['b.ts', ['c.ts']],
    ['c.ts', ['a.ts']],
    ['d.ts', ['a.ts']],
  ])
  t.same(cycles(g), [['a.ts', 'b.ts', 'c.ts']])
})

/**
 * The lines of a module that run (or bring in modules that run): declarations of values, imports and re-exports
 * that are not `type` ones, a default export of a value. A module that is only types has none.
 */
function runningLines(text: string): string[] {
  const code = text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '')
  return code.split('\n').filter(
    (l) =>
      /^\s*(export\s+)?(default\s+)?(declare\s+)?(const|let|var|function|class|enum|async|abstract)\b/.test(l) ||
      /^import\s+(?!type\b)/.test(l) ||
      /^export\s*(\*|\{)/.test(l) ||
      /^export\s+default\s+(?!interface\b|type\b)/.test(l),
  )
}

function typesOnly(file: string): string[] {
  return runningLines(readFileSync(join(SRC, file), 'utf8'))
}

t.test('the types-only check sees what runs', async (t) => {
  t.same(runningLines("import type { A } from './a.js'\nexport type B = A\nexport interface C { readonly d: number }\nexport type { E } from './e.js'"), [])
  for (const line of ["export * from './pool.js'", "export { shapeOf } from './pool.js'", "import { x } from './a.js'", "import './side.js'", 'export const A = 1', 'export default 42', 'export enum E { A }', '  const hidden = 1']) {
    t.same(runningLines(line), [line], line)
  }
})

t.test('IPC messages import only the domains\' type modules (plain data) and ground modules', async (t) => {
  const g = graph()
  const deps = g.get('messages.ts') ?? []
  t.ok(deps.length > 0, 'messages.ts read')
  for (const d of deps) t.ok(GROUND.includes(d) || d.endsWith('/types.ts'), `messages.ts imports ${d}`)
  for (const d of deps.filter((x) => x.endsWith('/types.ts'))) t.same(typesOnly(d), [], `${d} holds only types`)
})
