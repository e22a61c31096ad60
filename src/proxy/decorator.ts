import type { IncomingHttpHeaders } from 'node:http'
import type { Dispatcher } from 'undici'

type Controller = Dispatcher.DispatchController
type Handler = Dispatcher.DispatchHandler

/**
 * A dispatch handler that hands every event on to the one it wraps (undici's lib/handler/decorator-handler.js, for
 * the v7 hooks): a decorator overrides only the events it looks at.
 */
export class DecoratorHandler implements Handler {
  protected inner: Handler

  constructor(inner: Handler) {
    this.inner = inner
  }

  onRequestStart(controller: Controller, context: unknown): void {
    this.inner.onRequestStart?.(controller, context)
  }

  onResponseStart(controller: Controller, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    this.inner.onResponseStart?.(controller, statusCode, headers, statusMessage)
  }

  onResponseData(controller: Controller, chunk: Buffer): void {
    this.inner.onResponseData?.(controller, chunk)
  }

  onResponseEnd(controller: Controller, trailers: IncomingHttpHeaders): void {
    this.inner.onResponseEnd?.(controller, trailers)
  }

  onResponseError(controller: Controller, err: Error): void {
    this.inner.onResponseError?.(controller, err)
  }
}

/** The controller handed with an error for a request that was never sent (an open breaker): nothing to control. */
export const NOT_SENT: Controller = Object.freeze({
  abort() {},
  pause() {},
  resume() {},
  paused: false,
  aborted: true,
  reason: null,
})
