import { Writable } from 'node:stream'
import t from 'tap'
import { SlowBodies, StreamedBody } from '../../src/proxy/request-body.js'

const timing = { windowMs: 300, checkMs: 50 }

// The watch's timer is unref'd (it never keeps a worker alive): this one keeps the test process up while it waits.
const alive = setInterval(() => {}, 1_000)
t.teardown(() => clearInterval(alive))

/** A reader that takes every byte at once (an upstream that reads fast). */
function drain(): Writable {
  return new Writable({ write: (_c, _e, done) => done() })
}

function ended(body: StreamedBody): Promise<Error | null> {
  return new Promise((resolve) => {
    body.once('error', (err) => resolve(err))
    body.once('finish', () => resolve(null))
  })
}

t.test('a streamed body below the minimum rate over a window is ended with a 408 error, and counted', async (t) => {
  let slow = 0
  const watch = new SlowBodies(1000, () => slow++, timing)
  const body = new StreamedBody(null, watch)
  body.pipe(drain())
  const result = ended(body)
  body.write(Buffer.alloc(10)) // 10 bytes in 300 ms: far below 1000 bytes a second
  const err = await result
  t.equal((err as { status?: number } | null)?.status, 408)
  t.equal(slow, 1)
  t.equal(watch.size, 0, 'no longer watched')
})

t.test('a body that keeps the rate is left alone, and forgotten once it ends', async (t) => {
  let slow = 0
  const watch = new SlowBodies(1000, () => slow++, timing)
  const body = new StreamedBody(null, watch)
  body.pipe(drain())
  // 40,000 bytes a second, far above the rate: a test process stalled for a while (a busy machine) still keeps it.
  const feed = setInterval(() => body.write(Buffer.alloc(2_000)), 50)
  await new Promise((r) => setTimeout(r, 1_000))
  clearInterval(feed)
  const result = ended(body)
  body.end()
  t.equal(await result, null)
  t.equal(slow, 0)
  t.equal(watch.size, 0)
})

t.test('bytes waiting unread on our side (a slow upstream) do not count against the client', async (t) => {
  let slow = 0
  const watch = new SlowBodies(1000, () => slow++, timing)
  const body = new StreamedBody(null, watch) // nobody reads it
  body.write(Buffer.alloc(10))
  await new Promise((r) => setTimeout(r, 800))
  t.equal(slow, 0)
  t.equal(watch.size, 1)
  body.destroy()
  t.equal(watch.size, 0)
})

t.test('a body without a declared length is ended past the maximum; 0 as the rate watches nothing', async (t) => {
  const watch = new SlowBodies(0, () => {}, timing)
  const body = new StreamedBody(100, watch)
  t.equal(watch.size, 0)
  body.pipe(drain())
  const result = ended(body)
  body.write(Buffer.alloc(60))
  body.write(Buffer.alloc(60))
  t.equal((await result as { code?: string } | null)?.code, 'body_too_large')
})
