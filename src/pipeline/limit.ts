import { MeliproxyError } from '../errors.js'
import type { Exchange } from '../exchange.js'
import { DelayQueues } from '../limiter/delays.js'
import type { Limiter, Verdict } from '../limiter/limiter.js'
import { rateLimitHeaders, rejectionBody, retryAfterSeconds } from '../limiter/response.js'
import type { Logger } from '../log.js'
import { send } from '../proxy/reply.js'
import type { Pipeline, Stage } from './pipeline.js'

/**
 * The rate limits: a request no rule governs goes on at once; one whose tokens are in hand is decided
 * synchronously; one that needs a lease waits for it. Admitted requests carry RateLimit-* fields; rejected ones get
 * 429 and never reach the cache or the upstream. A request over an `onExceed: delay` rule waits in that bucket's
 * queue (src/limiter/delays.ts) until it fits or the rule's maxDelay passes; a rule that cannot be counted while
 * Redis is down and says `whenRedisDown: deny`, or whose primary does not answer while the worker has no tokens of it
 * in hand, answers 503 limiter_unavailable.
 */
/** A waiting head asks again at least this often (room can come back early: tokens another worker gave back). */
const RECHECK_MS = 200

export function limitStage(limiter: Limiter, queues: DelayQueues, log: Logger): Stage {
  function reject(x: Exchange, p: Pipeline, v: Verdict): void {
    x.limitedBy = v.rule.name
    if (v.unavailable) {
      return p.reject(x, new MeliproxyError('limiter_unavailable', `rate limit "${v.rule.name}" cannot be counted while its pool (Redis, or this instance's primary) does not answer`))
    }
    const body = rejectionBody(v)
    const headers = rateLimitHeaders(v)
    headers.push('retry-after', String(retryAfterSeconds(v)), 'content-type', 'application/json')
    headers.push('content-length', String(Buffer.byteLength(body)))
    send(x, 429, undefined, headers, body)
  }

  function decided(x: Exchange, p: Pipeline, v: Verdict): void {
    if (x.res.destroyed) return // the client left while it waited (recorded when it left)
    if (v.allowed) {
      x.rateHeaders = rateLimitHeaders(v)
      return p.next(x)
    }
    if (v.rule.delay && !v.unavailable) return void delay(x, p, v)
    reject(x, p, v)
  }

  /** A delay rule's bucket of the request that requests already wait on in this worker, as a refusal to queue on. */
  function queuedBucket(x: Exchange): Verdict | null {
    for (const b of limiter.rules.bucketsFor(x)) {
      if (b.rule.delay && queues.waiting(b.key) > 0) return { allowed: false, rule: b.rule, bucket: b.key, remaining: 0, resetMs: 0, unavailable: false }
    }
    return null
  }

  /**
   * Waits for room in the refusing bucket, first come first served within this worker: refused at once when the pool
   * says room cannot come within maxDelay for this request and those queued before it; otherwise it waits its turn,
   * then asks again each time the pool says room comes back (at most every RECHECK_MS), and goes on once admitted.
   * Past maxDelay, refused by a rule that does not delay, or Redis gone for a deny rule, it is rejected.
   */
  async function delay(x: Exchange, p: Pipeline, first: Verdict, decidedBefore = true): Promise<void> {
    const rule = first.rule
    // A request queued behind waiters without a decision of its own is counted (limited, and by the shadow rules) if
    // it is refused without one.
    const refuse = (v: Verdict): void => {
      if (!decidedBefore && v === first) {
        limiter.metrics.decision(rule, false)
        limiter.countShadow(x)
      }
      reject(x, p, v)
    }
    const started = performance.now()
    // Each request queued ahead needs its cost to come back first: at the rate, for a token bucket; a window's room
    // comes back all at once.
    const perUnitMs = rule.algorithm === 'token-bucket' ? rule.windowMs / rule.limit : 0
    const soonest = first.resetMs + queues.waiting(first.bucket) * rule.cost(x) * perUnitMs
    if (soonest > rule.maxDelayMs) {
      limiter.metrics.delayed.labels(rule.name, 'too_long').inc()
      return refuse(first)
    }
    const ticket = queues.enter(first.bucket)
    if (ticket === null) {
      limiter.metrics.delayed.labels(rule.name, 'queue_full').inc()
      return refuse(first)
    }
    let v: Verdict | null
    try {
      v = await waitForRoom(x, ticket.turn, first, started + rule.maxDelayMs, decidedBefore)
    } catch (err) {
      log.error('limiter failed while a request waited; request let through', { error: (err as Error).message })
      v = null
    } finally {
      ticket.leave()
    }
    if (x.res.destroyed) return // the client left while it waited (recorded when it left)
    if (v === null || v.allowed) {
      if (v !== null) limiter.metrics.delayed.labels(rule.name, 'admitted').inc()
      return v === null ? p.next(x) : decided(x, p, v)
    }
    limiter.metrics.delayed.labels(rule.name, 'rejected').inc()
    refuse(v)
  }

  /** The last verdict once it admits, or once waiting more is no use; null when no rule governs the request now. */
  async function waitForRoom(x: Exchange, turn: Promise<void>, first: Verdict, deadline: number, decidedBefore: boolean): Promise<Verdict | null> {
    if (!(await DelayQueues.until(turn, deadline - performance.now(), x.res))) return first
    let v = first
    for (;;) {
      // A request that queued without being decided (others were waiting) is counted on its first decision; later
      // ones are the same request asking again.
      const next = limiter.check(x, decidedBefore)
      decidedBefore = true
      if (next === null) return null // the rule went away meanwhile
      v = next instanceof Promise ? await next : next
      if (v.allowed || !v.rule.delay || v.unavailable) return v
      const left = deadline - performance.now()
      if (left <= 0) return v
      if (!(await DelayQueues.wait(Math.min(Math.max(1, v.resetMs), RECHECK_MS, left), x.res))) return v
    }
  }

  return (x, p) => {
    // First come, first served: while requests wait on a bucket of a delay rule, a new one for it queues behind them
    // rather than taking the room they wait for.
    if (queues.total > 0) {
      const queued = queuedBucket(x)
      if (queued !== null) return void delay(x, p, queued, false)
    }
    const verdict = limiter.check(x)
    if (verdict === null) return p.next(x)
    if (!(verdict instanceof Promise)) return decided(x, p, verdict)
    verdict.then(
      (v) => decided(x, p, v),
      (err: Error) => {
        // The limiter's pools never reject (Redis failures fall back); this is a bug, not the client's problem.
        log.error('limiter failed; request let through', { error: err.message })
        p.next(x)
      },
    )
  }
}
