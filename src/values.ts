/**
 * The value grammars every option and rule field is written in, one of each: durations, sizes, ratios, whole numbers,
 * booleans, lists and header names. A ground module: it imports nothing of meliproxy's. A parser throws BadValue with
 * what is wrong; the caller (src/config.ts, src/limiter/rules.ts) names the field and the source.
 */

/** A value that does not parse; the message says why, the caller adds where. */
export class BadValue extends Error {}

/** A scalar as trimmed text (numbers and booleans as written). */
export function text(raw: unknown): string {
  if (typeof raw === 'string') return raw.trim()
  if (typeof raw === 'number' || typeof raw === 'boolean') return String(raw)
  throw new BadValue(`expected a string, got ${JSON.stringify(raw)}`)
}

/** A whole number from min to max; `what` names it in the complaint ("a port"). */
export function wholeNumber(raw: unknown, min: number, max: number, what: string): number {
  const s = text(raw)
  if (!/^\d+$/.test(s) || Number(s) < min || Number(s) > max) throw new BadValue(`"${s}" is not ${what} (${min}-${max})`)
  return Number(s)
}

/** A ratio from 0 to 1 (`0.5`). */
export function ratio(raw: unknown): number {
  const s = text(raw)
  if (!/^(0(\.\d+)?|1(\.0+)?)$/.test(s)) throw new BadValue(`"${s}" is not a ratio from 0 to 1 (e.g. 0.5)`)
  return Number(s)
}

const DURATION_UNITS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const
type DurationUnit = keyof typeof DURATION_UNITS

/** What a duration may be: its units, its range, how it reads in a complaint, and the unit of a bare number. */
export interface DurationGrammar {
  /** Units it may be written in. */
  readonly units: readonly DurationUnit[]
  /** The unit of a bare number (`250` = 250 ms); null: a unit is required. */
  readonly bare: DurationUnit | null
  /** Inclusive range in milliseconds. */
  readonly min: number
  readonly max: number
  /** What it is, with examples: `a duration (e.g. 500ms, 5s, 1m, 1h)`. */
  readonly what: string
  /** How the range reads in a complaint: `above 0, at most 24h`. */
  readonly range: string
}

/** The one duration grammar: a number (decimals allowed) and a unit; each use says which units and what range. */
export function duration(raw: unknown, g: DurationGrammar): number {
  const s = text(raw)
  const m = /^(\d+(?:\.\d+)?)([a-z]+)?$/.exec(s)
  const unit = (m?.[2] ?? g.bare) as DurationUnit | null
  if (m === null || unit === null || !g.units.includes(unit)) throw new BadValue(`"${s}" is not ${g.what}`)
  const ms = Math.round(Number(m[1]) * DURATION_UNITS[unit])
  if (ms < g.min || ms > g.max) throw new BadValue(`"${s}" is out of range (${g.range})`)
  return ms
}

/** Timeouts and intervals: `250` (ms), `250ms`, `5s`, `1m`, `1h`; above 0, at most 24 h. */
export const TIMEOUT: DurationGrammar = {
  units: ['ms', 's', 'm', 'h'],
  bare: 'ms',
  min: 1,
  max: 86_400_000,
  what: 'a duration (e.g. 500ms, 5s, 1m, 1h)',
  range: 'above 0, at most 24h',
}

/** How long statistics are kept: `90m`, `48h`, `30d`; 1 minute to 400 days. */
export const RETENTION: DurationGrammar = {
  units: ['m', 'h', 'd'],
  bare: null,
  min: 60_000,
  max: 400 * 86_400_000,
  what: 'a retention (e.g. 48h, 30d)',
  range: '1m to 400d',
}

/** A rate limit's window: `30s`, `1m`, `1h`, `1d`; 1 second to 366 days. */
export const WINDOW: DurationGrammar = {
  units: ['s', 'm', 'h', 'd'],
  bare: null,
  min: 1_000,
  max: 366 * 86_400_000,
  what: 'a window (e.g. 30s, 1m, 1h)',
  range: '1s to 366d',
}

/** How long a delayed request may wait: `500ms`, `3s`, `1m`; 1 ms to 60 s (each one holds a socket). */
export const MAX_DELAY: DurationGrammar = {
  units: ['ms', 's', 'm'],
  bare: null,
  min: 1,
  max: 60_000,
  what: 'a delay from 1ms to 60s (e.g. 500ms, 3s)',
  range: '1ms to 60s',
}

const BYTE_UNITS: Record<string, number> = { b: 1, kb: 1024, kib: 1024, mb: 1024 ** 2, mib: 1024 ** 2, gb: 1024 ** 3, gib: 1024 ** 3 }

/** A size: `1048576`, `512kb`, `64mb`, `1gb` (binary units), in bytes. */
export function bytes(raw: unknown): number {
  const s = text(raw).toLowerCase()
  const m = /^(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?$/.exec(s)
  if (!m) throw new BadValue(`"${s}" is not a size (e.g. 512kb, 64mb)`)
  return Math.round(Number(m[1]) * BYTE_UNITS[m[2] ?? 'b']!)
}

/** true/false, yes/no, on/off, 1/0. */
export function bool(raw: unknown): boolean {
  if (typeof raw === 'boolean') return raw
  const s = text(raw).toLowerCase()
  if (['1', 'true', 'yes', 'on'].includes(s)) return true
  if (['0', 'false', 'no', 'off'].includes(s)) return false
  throw new BadValue(`"${s}" is not a boolean (true/false)`)
}

/** A list: a YAML/JSON list, or comma-separated text; empty items dropped. */
export function list(raw: unknown): string[] {
  if (Array.isArray(raw)) return raw.map(text).filter((s) => s !== '')
  return text(raw)
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
}

/** One of a fixed set of words (case-insensitive), as written in the set. */
export function oneOf<T extends string>(raw: unknown, allowed: readonly T[]): T {
  const s = text(raw).toLowerCase()
  if (!(allowed as readonly string[]).includes(s)) throw new BadValue(`"${s}" is not one of ${allowed.join(', ')}`)
  return s as T
}

const TOKEN = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/

/** True for an HTTP field name (RFC 9110 token). */
export function isHeaderName(s: string): boolean {
  return TOKEN.test(s)
}

/** An HTTP field name, lowercased. */
export function headerName(raw: unknown): string {
  const s = text(raw)
  if (!isHeaderName(s)) throw new BadValue(`"${s}" is not a header name`)
  return s.toLowerCase()
}
