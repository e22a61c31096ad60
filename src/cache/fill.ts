import type { IncomingHttpHeaders } from 'node:http'
import type { Dispatcher } from 'undici'
import type { Departure, Exchange, UpstreamTap } from '../exchange.js'
import { clientResponseHeaders } from '../proxy/headers.js'
import { ageMs, ownBytes, type CacheEntry } from './entry.js'

type Controller = Dispatcher.DispatchController
/** The handler that relays the answer to the client (src/proxy/relay.ts). */
export type ClientHandler = Dispatcher.DispatchHandler & Departure

/** What a fetch is for: a miss others wait on, a fetch of one client's own, or a background refresh (no client). */
export type FetchRole = 'lead' | 'own' | 'refresh'

/** What a fill needs of the cache it fills (src/cache/http-cache.ts HttpCache): decided there, called from here. */
export interface FillTarget {
  readonly maxObjectBytes: number
  storable(x: Exchange, status: number, headers: IncomingHttpHeaders): boolean
  entryFrom(x: Exchange, status: number, statusMessage: string, clientHeaders: readonly string[], body: Buffer, requestTime: number, responseTime: number): CacheEntry | null
  refreshed(x: Exchange, stale: CacheEntry, notModifiedHeaders: readonly string[], requestTime: number, responseTime: number): CacheEntry | null
  store(key: string, entry: CacheEntry): void
  relayed(): void
  answerFetched(x: Exchange, e: CacheEntry, revalidated: boolean): void
  fetched(key: string, role: FetchRole, stored: CacheEntry | null): void
}

const ERROR_STATUS = new Set([500, 502, 503, 504])

/**
 * Watches one upstream answer for the cache, as a handler decorator around the client's relay (alone for a background
 * refresh): collects a storable body and stores it, refreshes the stored entry on a 304 to the cache's validators,
 * and answers from the stale entry when the upstream fails where stale-if-error allows (the client's relay never sees
 * those answers). While it collects a body, a client that leaves does not stop the fetch. Once the fetch is over it
 * tells the cache (`fetched`: waiters, leases).
 */
export class CacheFill implements Dispatcher.DispatchHandler, UpstreamTap, Departure {
  readonly validators: string[] | null
  readonly #cache: FillTarget
  readonly #x: Exchange
  readonly #key: string
  readonly #stale: CacheEntry | null
  readonly #role: FetchRole
  readonly #requestTime = Date.now()
  #client: ClientHandler | null = null
  #controller: Controller | null = null
  #chunks: Buffer[] | null = null
  #bytes = 0
  #status = 0
  #statusMessage = ''
  #headers: IncomingHttpHeaders = {}
  /** The answer is kept from the client: the cache answers from an entry (refreshed by a 304, or stale on an error). */
  #held = false
  /** The client's relay got the answer's start. */
  #passed = false
  #finished = false
  #stored: CacheEntry | null = null
  #refreshed: CacheEntry | null = null

  constructor(cache: FillTarget, x: Exchange, key: string, stale: CacheEntry | null, validators: string[] | null, role: FetchRole) {
    this.#cache = cache
    this.#x = x
    this.#key = key
    this.#stale = stale
    this.validators = validators
    this.#role = role
  }

  /** Wraps the client's relay (UpstreamTap). */
  wrap(client: Dispatcher.DispatchHandler): Dispatcher.DispatchHandler {
    this.#client = client as ClientHandler
    return this
  }

  #staleIfError(): boolean {
    const s = this.#stale
    return s !== null && ageMs(s, Date.now()) < s.freshnessMs + s.sieMs
  }

  onRequestStart(controller: Controller, context: unknown): void {
    this.#controller = controller
    const client = this.#client
    if (client === null) return
    client.onRequestStart?.(controller, context)
    if (this.#x.departure === client) this.#x.departure = this
  }

  onResponseStart(controller: Controller, status: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    if (status < 200) return this.#client?.onResponseStart?.(controller, status, headers, statusMessage) // early hints go on
    this.#status = status
    this.#statusMessage = statusMessage ?? ''
    this.#headers = headers
    if (status === 304 && this.validators !== null && this.#stale !== null) {
      this.#refreshed = this.#cache.refreshed(this.#x, this.#stale, clientResponseHeaders(headers), this.#requestTime, Date.now())
      this.#held = true
      return
    }
    if (ERROR_STATUS.has(status) && this.#staleIfError()) {
      this.#held = true
      return
    }
    if (this.#x.method === 'GET' && this.#cache.storable(this.#x, status, headers)) {
      const length = Number(headers['content-length'] ?? 0)
      if (length <= this.#cache.maxObjectBytes) this.#chunks = []
    }
    if (this.#client === null) return
    this.#passed = true
    this.#client.onResponseStart?.(controller, status, headers, statusMessage)
  }

  onResponseData(controller: Controller, chunk: Buffer): void {
    if (this.#chunks !== null) {
      this.#bytes += chunk.length
      if (this.#bytes > this.#cache.maxObjectBytes) this.#chunks = null // too big: streams through uncached
      else this.#chunks.push(chunk)
    }
    if (this.#passed) this.#client!.onResponseData?.(controller, chunk)
  }

  onResponseEnd(controller: Controller, trailers: IncomingHttpHeaders): void {
    if (this.#refreshed !== null) {
      this.#cache.store(this.#key, this.#refreshed)
      this.#stored = this.#refreshed
    } else if (this.#chunks !== null) {
      const body = ownBytes(this.#chunks)
      const entry = this.#cache.entryFrom(this.#x, this.#status, this.#statusMessage, clientResponseHeaders(this.#headers), body, this.#requestTime, Date.now())
      if (entry !== null) {
        this.#cache.store(this.#key, entry)
        this.#stored = entry
      }
    }
    this.#chunks = null
    this.#finish()
    if (this.#held) return this.#answerHeld()
    if (this.#passed) {
      this.#client!.onResponseEnd?.(controller, trailers)
      this.#cache.relayed()
    }
  }

  onResponseError(controller: Controller, err: Error): void {
    this.#chunks = null
    this.#finish()
    if (this.#client === null) return
    if (this.#held || (!this.#passed && this.#staleIfError())) {
      this.#held = true
      return this.#answerHeld()
    }
    this.#client.onResponseError?.(controller, err)
    if (this.#x.res.headersSent) this.#cache.relayed()
  }

  /** The client left: the fetch goes on while it collects a body for the cache; otherwise the relay stops it. */
  clientLeft(): void {
    if (this.#chunks !== null) {
      // It may be paused for the departed client's backpressure: no 'drain' will come, so read on for the cache.
      if (this.#controller?.paused) this.#controller.resume()
      return
    }
    this.#client?.clientLeft()
  }

  /** The client gets the entry a 304 refreshed, else the stale one (stale-if-error, or a refresh not storable). */
  #answerHeld(): void {
    if (this.#client === null) return
    const entry = this.#refreshed ?? this.#stale!
    this.#cache.answerFetched(this.#x, entry, this.#refreshed !== null || this.#status === 304)
  }

  /** The fetch is over: once, before the client is answered (waiters get the entry first). */
  #finish(): void {
    if (this.#finished) return
    this.#finished = true
    if (this.#x.departure === this) this.#x.departure = null
    this.#cache.fetched(this.#key, this.#role, this.#stored)
  }
}
