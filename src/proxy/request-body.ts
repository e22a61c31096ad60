import type { IncomingMessage } from 'node:http'
import { Transform, type TransformCallback } from 'node:stream'
import { BodyTooLargeError, ClientAbortError, SlowBodyError } from '../errors.js'

/**
 * The client's request body on its way upstream, as nginx reads it (`proxy_request_buffering`): a body up to
 * `--request-buffering` bytes is read whole before the upstream request is opened (`readBody`), so a client that
 * sends it slowly ties up nothing upstream (its 408 comes from Node's --client-request-timeout check). A larger body
 * streams through a `StreamedBody`, which counts it against --max-body-size when it has no declared length and which
 * `SlowBodies` ends (408, the upstream request aborted) once it arrives slower than --request-body-min-rate.
 */

/** A streamed body is judged over windows this long (the first one is its grace period). */
export const RATE_WINDOW_MS = 5_000
/** How often the windows are checked. */
const CHECK_MS = 1_000

/** The body on its way upstream: counted, limited, and watched for its rate while it streams. */
export class StreamedBody extends Transform {
  readonly #max: number | null
  readonly #watch: SlowBodies | null
  #seen = 0
  /** Bytes received since `windowStart` (SlowBodies reads and resets both). */
  windowBytes = 0
  /** When the current rate window began (performance.now()). */
  windowStart = performance.now()

  constructor(max: number | null, watch: SlowBodies | null) {
    super()
    this.#max = max
    this.#watch = watch
    watch?.add(this)
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.#seen += chunk.length
    this.windowBytes += chunk.length
    if (this.#max !== null && this.#seen > this.#max) done(new BodyTooLargeError(this.#max))
    else done(null, chunk)
  }

  override _flush(done: TransformCallback): void {
    this.#watch?.delete(this)
    done()
  }

  override _destroy(err: Error | null, done: (err: Error | null) => void): void {
    this.#watch?.delete(this)
    done(err)
  }
}

/**
 * Streams `req`'s body (after `prefix`, the part already read) through a StreamedBody: `max` bounds a body without a
 * declared length (null: the guard checked the declared one). The client leaving ends it with ClientAbortError.
 */
export function streamBody(req: IncomingMessage, prefix: readonly Buffer[], max: number | null, watch: SlowBodies | null): StreamedBody {
  const body = new StreamedBody(max, watch)
  req.on('error', (err) => body.destroy(err))
  req.on('aborted', () => body.destroy(new ClientAbortError()))
  for (const chunk of prefix) body.write(chunk)
  return req.pipe(body)
}

/**
 * The streamed bodies of a worker, checked every CHECK_MS: one that received less than `minRate` bytes a second over
 * its last RATE_WINDOW_MS is ended with SlowBodyError (the first window is its grace period). A body whose bytes wait
 * unread on our side (the upstream reads slowly, or its request waits for a connection) is not the client's fault: its
 * window starts again.
 */
export class SlowBodies {
  readonly #bodies = new Set<StreamedBody>()
  readonly #minRate: number
  readonly #onSlow: () => void
  readonly #windowMs: number
  readonly #checkMs: number
  #timer: NodeJS.Timeout | null = null

  /** `minRate` in bytes a second (0: never); `onSlow` counts each body ended; the window and check period for tests. */
  constructor(minRate: number, onSlow: () => void, timing: { windowMs: number; checkMs: number } = { windowMs: RATE_WINDOW_MS, checkMs: CHECK_MS }) {
    this.#minRate = minRate
    this.#onSlow = onSlow
    this.#windowMs = timing.windowMs
    this.#checkMs = timing.checkMs
  }

  /** Watches `body` until it ends. */
  add(body: StreamedBody): void {
    if (this.#minRate === 0) return
    this.#bodies.add(body)
    if (this.#timer === null) this.#timer = setInterval(this.#check, this.#checkMs).unref()
  }

  /** Stops watching `body` (it ended, or failed); the timer stops with the last one. */
  delete(body: StreamedBody): void {
    this.#bodies.delete(body)
    if (this.#bodies.size === 0 && this.#timer !== null) {
      clearInterval(this.#timer)
      this.#timer = null
    }
  }

  /** Bodies watched now (for tests). */
  get size(): number {
    return this.#bodies.size
  }

  readonly #check = (): void => {
    const now = performance.now()
    for (const b of this.#bodies) {
      const elapsed = now - b.windowStart
      if (elapsed < this.#windowMs) continue
      const waiting = b.writableLength > 0 || b.readableLength > 0
      if (!waiting && b.windowBytes < (this.#minRate * elapsed) / 1000) {
        this.#onSlow()
        b.destroy(new SlowBodyError(`the request body arrived slower than ${this.#minRate} bytes a second`))
        continue
      }
      b.windowStart = now
      b.windowBytes = 0
    }
  }
}

/** What a BodyReader ends with: the whole body, a body that turned out larger than the buffer, or over the limit. */
export interface BodyReadDone {
  /** The whole body, read. */
  whole(body: Buffer): void
  /** More than the buffer holds: what was read, and the request (paused) to stream the rest from. */
  overflow(prefix: Buffer[]): void
  /** More than --max-body-size. */
  tooLarge(): void
}

/**
 * Reads a request body of up to `buffer` bytes whole. The client leaving, the parser refusing the rest (a bad chunk)
 * or Node's request timeout end the read without a call: the request is then answered by the server's refusal (or not
 * at all) and recorded when its response closes; nothing went upstream.
 */
export function readBody(req: IncomingMessage, buffer: number, max: number, done: BodyReadDone): void {
  const chunks: Buffer[] = []
  let size = 0
  const stop = (): void => {
    req.off('data', onData)
    req.off('end', onEnd)
    req.off('close', onClose)
  }
  const onData = (chunk: Buffer): void => {
    chunks.push(chunk)
    size += chunk.length
    if (size <= buffer && size <= max) return
    stop()
    req.pause()
    if (size > max) done.tooLarge()
    else done.overflow(chunks)
  }
  const onEnd = (): void => {
    stop()
    done.whole(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size))
  }
  const onClose = (): void => {
    if (!req.complete) stop()
  }
  req.on('data', onData)
  req.on('end', onEnd)
  req.on('close', onClose)
  // An error without a listener would be thrown; the close that follows is what counts.
  if (req.listenerCount('error') === 0) req.on('error', ignore)
}

function ignore(): void {}
