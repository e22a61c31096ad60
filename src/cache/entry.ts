import type { IncomingHttpHeaders } from 'node:http'

/**
 * A stored response and its binary encoding for Redis: [u32 meta length][meta JSON][body bytes].
 * The body is stored as bytes, never as base64 or JSON.
 */

/** One stored response (one variant of a URL). */
export interface CacheEntry {
  readonly status: number
  readonly statusMessage: string
  /** Response headers as sent to clients (hop-by-hop removed, Via added), flat [name, value, ...], lowercase names. */
  readonly headers: readonly string[]
  readonly body: Buffer
  /** When the response arrived, ms since the epoch, and its corrected initial age then (RFC 9111 4.2.3). */
  readonly responseTime: number
  readonly initialAgeMs: number
  readonly freshnessMs: number
  readonly swrMs: number
  readonly sieMs: number
  /** Vary names and the normalised request values this variant was stored for. */
  readonly vary: readonly string[]
  readonly variant: string
  readonly etag: string | null
  readonly lastModified: string | null
}

/** How long a stale entry with a validator is kept for conditional revalidation (a 304 costs no body transfer). */
const REVALIDATION_KEEP_MS = 10 * 60_000

/** How long an entry is worth keeping at all: fresh, then usable stale, then (with a validator) revalidatable. */
export function keepMs(e: CacheEntry): number {
  const validator = e.etag !== null || e.lastModified !== null
  return Math.max(0, e.freshnessMs + Math.max(e.swrMs, e.sieMs, validator ? REVALIDATION_KEEP_MS : 0) - e.initialAgeMs)
}

/** The entry's current age in ms (RFC 9111 4.2.3). */
export function ageMs(e: CacheEntry, now: number): number {
  return e.initialAgeMs + Math.max(0, now - e.responseTime)
}

/** Per-entry memory besides body and headers: the entry object, key, variant, arrays, LRU slots (from the soak: heap per entry). */
const ENTRY_OVERHEAD = 4_000
/** Per header string: V8's string header and the array slot; each entry holds its headers twice (stored and served). */
const HEADER_OVERHEAD = 48

/** Bytes the entry holds in memory (for the L1 byte bound). */
export function entrySize(e: CacheEntry): number {
  let n = e.body.length + ENTRY_OVERHEAD
  for (const h of e.headers) n += 2 * (h.length + HEADER_OVERHEAD)
  return n
}

/**
 * The bytes in a buffer of their own. A body kept in L1 must not be a slice of a larger buffer: Node hands out small
 * buffers as slices of a shared 8 KB pool (and a Redis reply holds the metadata too), and one live slice keeps the
 * whole block alive, so the memory behind the L1 byte bound would be several times the bodies' size.
 */
export function ownBytes(chunks: readonly Buffer[]): Buffer {
  let total = 0
  for (const c of chunks) total += c.length
  const out = Buffer.allocUnsafeSlow(total)
  let at = 0
  for (const c of chunks) at += c.copy(out, at)
  return out
}

function normalise(name: string, value: string | string[] | undefined): string {
  if (value === undefined) return ''
  const text = Array.isArray(value) ? value.join(',') : value
  const collapsed = text.replace(/\s*,\s*/g, ',').replace(/\s+/g, ' ').trim()
  // Content-negotiation fields are case-insensitive token lists; others (User-Agent) are compared as sent.
  return name.startsWith('accept') ? collapsed.toLowerCase() : collapsed
}

/**
 * The variant id for a request under a Vary list: '-' without Vary, else the normalised values of the named
 * request fields, joined (compared as a string on every hit, so no hashing on the hot path).
 */
export function variantId(vary: readonly string[], requestHeaders: IncomingHttpHeaders): string {
  if (vary.length === 0) return '-'
  let id = ''
  for (const name of vary) id += normalise(name, requestHeaders[name]) + '\n'
  return id
}

/** Encodes an entry for Redis. */
export function encodeEntry(e: CacheEntry): Buffer {
  const meta = Buffer.from(
    JSON.stringify({
      s: e.status,
      m: e.statusMessage,
      h: e.headers,
      rt: e.responseTime,
      ia: e.initialAgeMs,
      f: e.freshnessMs,
      w: e.swrMs,
      i: e.sieMs,
      v: e.vary,
      vi: e.variant,
      et: e.etag,
      lm: e.lastModified,
    }),
  )
  const head = Buffer.allocUnsafe(4)
  head.writeUInt32BE(meta.length, 0)
  return Buffer.concat([head, meta, e.body])
}

/** Decodes an entry from Redis; null when the bytes are not one (a foreign or truncated value). */
export function decodeEntry(buf: Buffer): CacheEntry | null {
  if (buf.length < 4) return null
  const metaLength = buf.readUInt32BE(0)
  if (4 + metaLength > buf.length) return null
  try {
    const m = JSON.parse(buf.subarray(4, 4 + metaLength).toString()) as Record<string, unknown>
    return {
      status: m.s as number,
      statusMessage: m.m as string,
      headers: m.h as string[],
      body: ownBytes([buf.subarray(4 + metaLength)]),
      responseTime: m.rt as number,
      initialAgeMs: m.ia as number,
      freshnessMs: m.f as number,
      swrMs: m.w as number,
      sieMs: m.i as number,
      vary: m.v as string[],
      variant: m.vi as string,
      etag: m.et as string | null,
      lastModified: m.lm as string | null,
    }
  } catch {
    return null
  }
}
