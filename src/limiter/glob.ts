/**
 * Path and header globs, compiled once to anchored regular expressions.
 * Path globs: `*` matches within one segment (no `/`), `**` matches across segments (anything, `/` included).
 * Header globs: `*` matches any run of characters.
 */

const REGEX_SPECIAL = /[.+?^${}()|[\]\\]/g

/** Compiles a path glob; returns an error message for a bad one. */
export function compilePathGlob(glob: string): RegExp | string {
  if (!glob.startsWith('/')) return `"${glob}" must start with /`
  if (/[\s?#]/.test(glob)) return `"${glob}" must not contain spaces, ? or #`
  if (glob.includes('***')) return `"${glob}" has *** (use * within a segment, ** across segments)`
  let source = ''
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!
    if (c === '*') {
      if (glob[i + 1] === '*') {
        source += '.*'
        i++
      } else {
        source += '[^/]*'
      }
    } else {
      source += c.replace(REGEX_SPECIAL, '\\$&')
    }
  }
  return new RegExp('^' + source + '$')
}

/** Compiles a header-value glob (`*` = anything), matched case-sensitively against the whole value. */
export function compileValueGlob(glob: string): RegExp {
  return new RegExp('^' + glob.split('*').map((part) => part.replace(REGEX_SPECIAL, '\\$&')).join('.*') + '$')
}
