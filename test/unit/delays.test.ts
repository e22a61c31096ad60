import { EventEmitter } from 'node:events'
import { Registry } from 'prom-client'
import t from 'tap'
import { DelayQueues, PER_BUCKET } from '../../src/limiter/delays.js'
import { LimiterMetrics } from '../../src/limiter/metrics.js'

t.test('a bucket queue is first come first served: the next request is the head as soon as the head leaves', async (t) => {
  const queues = new DelayQueues(new LimiterMetrics(new Registry()))
  const order: number[] = []
  const tickets = [0, 1, 2].map((i) => {
    const ticket = queues.enter('b')!
    void ticket.turn.then(() => order.push(i))
    return ticket
  })
  await new Promise((r) => setImmediate(r))
  t.same(order, [0], 'only the first is the head')
  t.equal(queues.waiting('b'), 3)
  tickets[1]!.leave() // the second gives up (its client went away): it never becomes the head
  tickets[0]!.leave()
  await new Promise((r) => setImmediate(r))
  t.same(order, [0, 2], 'the third is the head once the first leaves')
  tickets[2]!.leave()
  tickets[2]!.leave() // leaving twice changes nothing
  t.equal(queues.waiting('b'), 0)
})

t.test(`a bucket holds at most ${PER_BUCKET} waiting requests in a worker`, async (t) => {
  const queues = new DelayQueues(new LimiterMetrics(new Registry()))
  const tickets = Array.from({ length: PER_BUCKET }, () => queues.enter('full'))
  t.ok(tickets.every((x) => x !== null))
  t.equal(queues.enter('full'), null, 'the next one is refused')
  t.not(queues.enter('other'), null, 'another bucket still has room')
})

t.test('until() resolves false when the client goes away or the deadline passes, true on its turn', async (t) => {
  const res = new EventEmitter()
  const never = new Promise<void>(() => {})
  const gone = DelayQueues.until(never, 10_000, res)
  res.emit('close')
  t.equal(await gone, false, 'the client left')
  t.equal(await DelayQueues.until(never, 5, res), false, 'the deadline passed')
  t.equal(await DelayQueues.until(Promise.resolve(), 10_000, res), true, 'its turn came')
  t.equal(res.listenerCount('close'), 0, 'no listener left behind')
})
