/** The bench commands' arguments: `--name N` numbers with defaults. */

export const args = process.argv.slice(2)

/** The number after `name` on the command line, or `def` when it is absent. */
export function flag(name: string, def: number): number {
  const i = args.indexOf(name)
  return i === -1 ? def : Number(args[i + 1])
}
