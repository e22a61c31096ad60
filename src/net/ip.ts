import { BlockList, isIP } from 'node:net'

/**
 * IP addresses and CIDR ranges, on top of node:net's BlockList (which already matches v4 and v6 subnets).
 */

/** The textual address with an IPv4-mapped IPv6 prefix (`::ffff:1.2.3.4`) removed, as sockets on `::` report it. */
export function normalizeIp(address: string): string {
  return address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address
}

/** A parsed CIDR (a bare address is a /32 or /128). */
export interface Cidr {
  readonly address: string
  readonly prefix: number
  readonly family: 'ipv4' | 'ipv6'
}

/** Parses `a.b.c.d`, `a.b.c.d/n`, `x::y` or `x::y/n`; returns an error message instead of throwing. */
export function parseCidr(text: string): Cidr | string {
  const slash = text.indexOf('/')
  const address = slash === -1 ? text : text.slice(0, slash)
  const version = isIP(address)
  if (version === 0) return `"${text}" is not an IP address or CIDR`
  const max = version === 4 ? 32 : 128
  let prefix = max
  if (slash !== -1) {
    const bits = text.slice(slash + 1)
    if (!/^\d{1,3}$/.test(bits) || Number(bits) > max) return `"${text}" has a bad prefix length (0-${max})`
    prefix = Number(bits)
  }
  return { address, prefix, family: version === 4 ? 'ipv4' : 'ipv6' }
}

/** A fixed set of CIDRs that answers "is this address inside?" */
export class IpSet {
  readonly #list = new BlockList()
  readonly size: number

  constructor(cidrs: readonly Cidr[]) {
    for (const c of cidrs) this.#list.addSubnet(c.address, c.prefix, c.family)
    this.size = cidrs.length
  }

  /** True when the address (v4, v6 or v4-mapped v6) is inside one of the ranges. */
  has(address: string): boolean {
    if (this.size === 0) return false
    const ip = normalizeIp(address)
    const version = isIP(ip)
    if (version === 0) return false
    return this.#list.check(ip, version === 4 ? 'ipv4' : 'ipv6')
  }
}
