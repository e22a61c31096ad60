import { BlockList, isIP } from 'node:net'

/**
 * IP addresses and CIDR ranges. IPv4 ranges are matched as 32-bit integers (the common case, on the hot path);
 * IPv6 ranges through node:net's BlockList.
 */

/** The textual address with an IPv4-mapped IPv6 prefix (`::ffff:1.2.3.4`) removed, as sockets on `::` report it. */
export function normalizeIp(address: string): string {
  return address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address
}

/**
 * The address a client is counted under by a rule's `per: ip`: an IPv4 address (or an IPv4-mapped IPv6 one) as it
 * is, an IPv6 address as its network of `v6Bits` bits in RFC 5952 form (`2001:db8:1:2::/64`). One IPv6 client is
 * usually given a whole /64 (RFC 7421), so keying its full address would let it rotate through 2^64 buckets.
 * Text that is not an address is returned unchanged.
 */
export function clientNetwork(ip: string, v6Bits: number): string {
  if (ip.indexOf(':') === -1) return ip // IPv4, the common case: no work and nothing allocated
  const g = GROUPS
  if (!ipv6Groups(ip, g)) return ip
  // IPv4-mapped, however it is written (`::FFFF:1.2.3.4`, `0:0:0:0:0:ffff:102:304`): counted as the IPv4 address.
  if (g[0] === 0 && g[1] === 0 && g[2] === 0 && g[3] === 0 && g[4] === 0 && g[5] === 0xffff) return `${g[6]! >> 8}.${g[6]! & 255}.${g[7]! >> 8}.${g[7]! & 255}`
  for (let i = 0; i < 8; i++) {
    const keep = Math.min(16, Math.max(0, v6Bits - i * 16))
    g[i] = g[i]! & ((0xffff << (16 - keep)) & 0xffff)
  }
  return `${ipv6Text(g)}/${v6Bits}`
}

/** Scratch groups for clientNetwork (synchronous, so one array serves every call). */
const GROUPS = new Uint16Array(8)

/** Reads an IPv6 address (a zone `%eth0` ignored) into eight 16-bit groups; false when it is not one. */
function ipv6Groups(text: string, g: Uint16Array): boolean {
  const zone = text.indexOf('%')
  const ip = zone === -1 ? text : text.slice(0, zone)
  if (isIP(ip) !== 6) return false // from here on the text is well formed
  let n = 0
  let gap = -1
  let value = 0
  let groupStart = 0
  for (let i = 0; i < ip.length; i++) {
    const c = ip.charCodeAt(i)
    if (c === 58 /* : */) {
      if (i > groupStart) g[n++] = value
      if (ip.charCodeAt(i + 1) === 58) {
        gap = n
        i++
      }
      value = 0
      groupStart = i + 1
    } else if (c === 46 /* . */) {
      const v4 = ipv4ToInt(ip.slice(groupStart)) // a dotted IPv4 tail: the last two groups
      g[n++] = v4 >>> 16
      g[n++] = v4 & 0xffff
      groupStart = ip.length
      break
    } else {
      value = value * 16 + (c <= 57 ? c - 48 : (c | 0x20) - 87)
    }
  }
  if (groupStart < ip.length) g[n++] = value
  if (gap !== -1) {
    const tail = n - gap
    for (let i = 0; i < tail; i++) g[7 - i] = g[n - 1 - i]!
    for (let i = gap; i < 8 - tail; i++) g[i] = 0
  }
  return true
}

/** Eight 16-bit groups as RFC 5952 text: lowercase, no leading zeros, the longest run of two or more zero groups as `::`. */
function ipv6Text(g: Uint16Array): string {
  let runAt = -1
  let runLen = 1
  for (let i = 0; i < 8; ) {
    if (g[i] !== 0) {
      i++
      continue
    }
    let j = i
    while (j < 8 && g[j] === 0) j++
    if (j - i > runLen) {
      runAt = i
      runLen = j - i
    }
    i = j
  }
  let out = ''
  let colon = false
  for (let i = 0; i < 8; i++) {
    if (i === runAt) {
      out += '::'
      colon = false
      i += runLen - 1
      continue
    }
    if (colon) out += ':'
    out += g[i]!.toString(16)
    colon = true
  }
  return out
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

/** A dotted IPv4 address as an unsigned 32-bit integer, or -1 when it is not one. */
function ipv4ToInt(ip: string): number {
  let value = 0
  let octet = 0
  let digits = 0
  let dots = 0
  for (let i = 0; i < ip.length; i++) {
    const c = ip.charCodeAt(i)
    if (c === 46 /* . */) {
      if (digits === 0 || ++dots > 3) return -1
      value = value * 256 + octet
      octet = 0
      digits = 0
    } else if (c >= 48 && c <= 57) {
      octet = octet * 10 + (c - 48)
      if (++digits > 3 || octet > 255) return -1
    } else {
      return -1
    }
  }
  if (dots !== 3 || digits === 0) return -1
  return value * 256 + octet
}

/** A fixed set of CIDRs that answers "is this address inside?" */
export class IpSet {
  readonly #v4: { network: number; mask: number }[] = []
  readonly #v6 = new BlockList()
  readonly #hasV6: boolean
  readonly size: number

  constructor(cidrs: readonly Cidr[]) {
    let v6 = false
    for (const c of cidrs) {
      if (c.family === 'ipv4') {
        const mask = c.prefix === 0 ? 0 : (0xffffffff << (32 - c.prefix)) >>> 0
        this.#v4.push({ network: (ipv4ToInt(c.address) & mask) >>> 0, mask })
      } else {
        this.#v6.addSubnet(c.address, c.prefix, 'ipv6')
        v6 = true
      }
    }
    this.#hasV6 = v6
    this.size = cidrs.length
  }

  /** True when the address (v4, v6 or v4-mapped v6) is inside one of the ranges. */
  has(address: string): boolean {
    if (this.size === 0) return false
    const ip = normalizeIp(address)
    const n = ipv4ToInt(ip)
    if (n !== -1) {
      for (const r of this.#v4) if (((n & r.mask) >>> 0) === r.network) return true
      return false
    }
    return this.#hasV6 && isIP(ip) === 6 && this.#v6.check(ip, 'ipv6')
  }
}
