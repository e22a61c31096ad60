import type { IncomingHttpHeaders } from 'node:http'

/**
 * Header rewriting at the proxy boundary, as RFC 9110 requires of an intermediary:
 * hop-by-hop fields (section 7.6.1) are dropped in both directions, including every field the Connection header
 * names; Via (7.6.3) is appended in both directions; Host is the upstream's (7.2).
 */

/** Fields that describe one connection and must not be forwarded (RFC 9110 7.6.1, plus the legacy Proxy-Connection). */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
])

/** The Via entry meliproxy adds. */
export const VIA = '1.1 meliproxy'

/**
 * The field names a Connection header lists beyond the hop-by-hop set, or null when there are none
 * (the common `keep-alive` / `close` values take the fast path).
 */
function connectionTokens(value: string | string[] | undefined): Set<string> | null {
  if (value === undefined) return null
  if (typeof value === 'string') {
    const v = value.length < 11 ? value.toLowerCase() : ''
    if (v === 'keep-alive' || v === 'close') return null
  }
  const joined = Array.isArray(value) ? value.join(',') : value
  const tokens = new Set<string>()
  for (const t of joined.split(',')) {
    const token = t.trim().toLowerCase()
    if (token !== '') tokens.add(token)
  }
  return tokens
}

/** What a forwarded request's headers are built from. */
export interface RequestHeaderInput {
  readonly rawHeaders: readonly string[]
  readonly headers: IncomingHttpHeaders
  readonly peerIp: string
  readonly peerTrusted: boolean
  readonly upstreamHost: string
  /** Leave out fields whose name contains `_` (--headers-with-underscores drop). */
  readonly dropUnderscored: boolean
}

/**
 * The flat [name, value, ...] list sent upstream: hop-by-hop and Expect dropped (Node answers 100-continue itself),
 * Host set to the upstream's, X-Forwarded-For appended with the peer, X-Forwarded-Proto/-Host set
 * (kept from a trusted proxy), Via appended. Repeated fields keep their order.
 */
export function upstreamRequestHeaders(input: RequestHeaderInput): string[] {
  const { rawHeaders, headers, peerIp, peerTrusted, upstreamHost, dropUnderscored } = input
  const named = connectionTokens(headers.connection)
  const out: string[] = ['host', upstreamHost]
  let forwardedFor: string | null = null
  let via: string | null = null
  let sawProto = false
  let sawHost = false
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!
    const value = rawHeaders[i + 1]!
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower) || (named !== null && named.has(lower))) continue
    if (dropUnderscored && lower.includes('_')) continue
    switch (lower) {
      case 'host':
      case 'expect':
        continue
      case 'x-forwarded-for':
        forwardedFor = forwardedFor === null ? value : forwardedFor + ', ' + value
        continue
      case 'via':
        via = via === null ? value : via + ', ' + value
        continue
      case 'x-forwarded-proto':
        if (!peerTrusted || sawProto) continue
        sawProto = true
        break
      case 'x-forwarded-host':
        if (!peerTrusted || sawHost) continue
        sawHost = true
        break
    }
    out.push(name, value)
  }
  out.push('x-forwarded-for', forwardedFor === null ? peerIp : forwardedFor + ', ' + peerIp)
  if (!sawProto) out.push('x-forwarded-proto', 'http')
  if (!sawHost && headers.host !== undefined) out.push('x-forwarded-host', headers.host)
  out.push('via', via === null ? VIA : via + ', ' + VIA)
  return out
}

/**
 * The flat [name, value, ...] list sent to the client for an upstream response: hop-by-hop fields dropped,
 * repeated fields (Set-Cookie, ...) kept one line each, Via appended.
 */
export function clientResponseHeaders(headers: IncomingHttpHeaders): string[] {
  const named = connectionTokens(headers.connection)
  const out: string[] = []
  let via: string | null = null
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || (named !== null && named.has(name))) continue
    const value = headers[name]
    if (value === undefined) continue
    if (name === 'via') {
      via = Array.isArray(value) ? value.join(', ') : value
      continue
    }
    if (Array.isArray(value)) {
      for (const v of value) out.push(name, v)
    } else {
      out.push(name, value)
    }
  }
  out.push('via', via === null ? VIA : via + ', ' + VIA)
  return out
}
