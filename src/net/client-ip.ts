import { isIP } from 'node:net'
import { normalizeIp, type IpSet } from './ip.js'

/**
 * The client's address as limits and statistics see it: the socket's peer, unless the peer is a trusted proxy
 * (--trust-proxy); then the right-most X-Forwarded-For entry that is not itself a trusted proxy. Entries left of
 * that one were written by the client and prove nothing. A malformed entry stops the walk at the last trusted hop.
 */
export function clientIp(peer: string, forwardedFor: string | string[] | undefined, trusted: IpSet): string {
  if (forwardedFor === undefined || !trusted.has(peer)) return peer
  const list = Array.isArray(forwardedFor) ? forwardedFor.join(',') : forwardedFor
  let hop = peer
  let end = list.length
  while (end > 0) {
    const comma = list.lastIndexOf(',', end - 1)
    const entry = normalizeIp(list.slice(comma + 1, end).trim())
    end = comma === -1 ? 0 : comma
    if (isIP(entry) === 0) return hop
    if (!trusted.has(entry)) return entry
    hop = entry
  }
  return hop
}
