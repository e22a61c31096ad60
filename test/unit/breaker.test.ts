import t from 'tap'
import { CircuitBreaker } from '../../src/proxy/breaker.js'
import type { BreakerState } from '../../src/proxy/types.js'
import { RetryBudget } from '../../src/proxy/retry.js'

const options = { failures: 3, errorRatio: 0.5, windowMs: 10_000, minRequests: 10, openMs: 5_000 }

function make(now: { t: number }, opts = options): { b: CircuitBreaker; changes: BreakerState[] } {
  const changes: BreakerState[] = []
  return { b: new CircuitBreaker(opts, (s) => changes.push(s), () => now.t), changes }
}

t.test('opens after consecutive failures, refuses while open, probes once half-open, closes on success', async (t) => {
  const now = { t: 1_000_000 }
  const { b, changes } = make(now)
  b.record(false)
  b.record(false)
  b.record(true) // resets the streak
  b.record(false)
  b.record(false)
  t.equal(b.state, 'closed')
  t.ok(b.allow())
  b.record(false)
  t.equal(b.state, 'open')
  t.notOk(b.allow(), 'refused while open')
  t.equal(b.retryAfterMs, 5_000)
  now.t += 4_999
  t.notOk(b.allow())
  now.t += 1
  t.ok(b.allow(), 'one probe once the open time is over')
  t.equal(b.state, 'half-open')
  t.notOk(b.allow(), 'only one probe at a time')
  b.record(true)
  t.equal(b.state, 'closed')
  t.ok(b.allow())
  t.same(changes, ['open', 'half-open', 'closed'])
})

t.test('a failed probe opens it again; a probe whose client left frees the slot', async (t) => {
  const now = { t: 0 }
  const { b } = make(now)
  for (let i = 0; i < 3; i++) b.record(false)
  now.t += 5_000
  t.ok(b.allow())
  b.record(false)
  t.equal(b.state, 'open')
  t.equal(b.retryAfterMs, 5_000)
  now.t += 5_000
  t.ok(b.allow())
  b.release()
  t.ok(b.allow(), 'the slot is free again')
})

t.test('opens on the error ratio over the window once enough requests were seen', async (t) => {
  const now = { t: 0 }
  const { b } = make(now, { ...options, failures: 1_000 })
  for (let i = 0; i < 4; i++) {
    b.record(true)
    b.record(false)
  }
  t.equal(b.state, 'closed', '8 requests: below minRequests')
  b.record(true)
  b.record(false)
  t.equal(b.state, 'open', '10 requests, half failed')
  const fresh = make(now, { ...options, failures: 1_000 }).b
  for (let i = 0; i < 6; i++) fresh.record(false)
  now.t += 11_000 // those fall out of the window
  for (let i = 0; i < 10; i++) fresh.record(i % 3 === 0 ? false : true)
  t.equal(fresh.state, 'closed', '4 of 10 in the window failed')
})

t.test('failures 0 turns the breaker off', async (t) => {
  const { b } = make({ t: 0 }, { ...options, failures: 0 })
  for (let i = 0; i < 100; i++) b.record(false)
  t.ok(b.allow())
  t.equal(b.state, 'closed')
})

t.test('the retry budget keeps retries near the ratio', async (t) => {
  const budget = new RetryBudget(0.2, 10)
  let retries = 0
  for (let i = 0; i < 1_000; i++) {
    budget.deposit()
    if (budget.withdraw()) retries++
  }
  t.ok(retries >= 200 && retries <= 211, `${retries} retries for 1000 failing requests`)
})
