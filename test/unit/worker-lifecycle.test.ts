import t from 'tap'
import { loadConfig } from '../../src/config.js'
import { Worker } from '../../src/worker.js'

/**
 * A worker's life (src/worker.ts): its timers and its listener for the primary's messages start once, in start(),
 * and stop when it is done; a worker closed before it started never starts listening.
 */

function config() {
  // Nothing is asked of the upstream here: no request is sent.
  const c = loadConfig({ flags: { upstream: 'http://127.0.0.1:9', host: '127.0.0.1', workers: '1', logLevel: 'error', accessLog: false }, env: {} })
  return { ...c, port: 0 }
}

t.test('start() hears the primary once, however often it is called; closed, the worker stops hearing it', async (t) => {
  const w = new Worker(config())
  const built = process.listenerCount('message')
  await w.start()
  t.equal(process.listenerCount('message'), built + 1, 'one listener for the primary once started')
  await w.start()
  t.equal(process.listenerCount('message'), built + 1, 'a second start adds none')
  w.close('test over')
  await w.closed
  t.equal(process.listenerCount('message'), built, 'the listener is gone once the worker is done')
})

t.test('close() before start(): closed resolves, and start() then neither listens nor hears the primary', async (t) => {
  const w = new Worker(config())
  const built = process.listenerCount('message')
  w.close('closed before it started')
  await w.closed
  await w.start()
  t.equal(w.port(), null, 'not listening')
  t.equal(process.listenerCount('message'), built, 'no listener added')
})
