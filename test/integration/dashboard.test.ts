import { existsSync } from 'node:fs'
import t from 'tap'
import { chromium, type Browser } from 'playwright-core'
import { closeAgents, send } from '../helpers/client.js'
import { admin, startMeliproxy, waitFor, writeConfig, type RunningProxy } from '../helpers/meliproxy.js'
import { startUpstream, type TestUpstream } from '../helpers/upstream.js'

/**
 * The dashboard in headless Chromium (Debian's chromium, driven by playwright-core): it loads with no console
 * errors, shows the traffic the test sent, and a rule edited on the page is what the proxy enforces next.
 */

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
const TOKEN = 'dashboard-token'
let upstream: TestUpstream
let proxy: RunningProxy
let browser: Browser

// .ci/run installs Debian's chromium, so CI always runs this file; elsewhere it says why it did not run.
if (existsSync(CHROMIUM)) register()
else t.plan(0, `${CHROMIUM} is not installed (apt-get install chromium, as .ci/run does)`)

function register(): void {
  t.before(async () => {
    upstream = await startUpstream()
    for (const prefix of ['/items', '/categories']) {
      upstream.route(prefix, (_req, res) => {
        res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=60' })
        res.end('{}')
      })
    }
    const config = writeConfig({ limits: [{ name: 'items-ip', match: { path: '/items/*' }, per: ['ip'], limit: 5, window: '1h' }] })
    proxy = await startMeliproxy(['--upstream', upstream.url, '--admin-token', TOKEN, '--config', config])
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] })
  })
  t.teardown(async () => {
    await browser?.close()
    await proxy?.stop()
    await closeAgents()
    await upstream?.close()
  })

  t.test('the page shows the traffic sent, with no console errors, and edits the rules', async (t) => {
    // 12 requests for one category (1 miss, then hits), 8 items from one client (5 pass, 3 limited): 20 in all.
    for (let i = 0; i < 12; i++) await send(`${proxy.url}/categories/MLA97994`, { from: '127.0.0.31' })
    const items: number[] = []
    for (let i = 0; i < 8; i++) items.push((await send(`${proxy.url}/items/MLA${i}`, { from: '127.0.0.32' })).status)
    t.same(items, [200, 200, 200, 200, 200, 429, 429, 429])
    // Generous deadlines throughout: statistics are flushed about once a second and the page refreshes on a timer,
    // and a busy machine (Chromium included) is slower at both.
    let total = -1
    t.ok(await waitFor(async () => (total = (await admin(proxy, '/api/stats')).body.totals.requests) === 20, 20_000), `the API has all 20 (saw ${total})`)

    const page = await browser.newPage()
    const problems: string[] = []
    const scriptErrors: string[] = []
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(m.text())
    })
    page.on('pageerror', (err) => scriptErrors.push(err.message))
    await page.goto(proxy.adminUrl + '/')
    await page.waitForFunction(() => document.getElementById('total-requests')?.textContent === '20', null, { timeout: 20_000 })
    t.equal(await page.textContent('#limited'), '3', 'limited requests')
    // Without Redis each worker's L1 misses once per URL: 1 or 2 misses for the category, 5 for the distinct items.
    const cache = (await admin(proxy, '/api/stats')).body.totals.cache
    t.equal((cache.HIT ?? 0) + (cache.MISS ?? 0), 17, '12 categories and 5 admitted items were cache lookups')
    t.ok(cache.HIT === 10 || cache.HIT === 11, `${cache.HIT} hits`)
    t.equal(await page.textContent('#hit-ratio'), `${((cache.HIT / 17) * 100).toFixed(1)}%`, 'the hit ratio')
    t.match(await page.textContent('#top-path'), /\/categories\/MLA97994\s*12/, 'top paths')
    t.match(await page.textContent('#top-ip'), /127\.0\.0\.31\s*12.*127\.0\.0\.32\s*8/s, 'top client IPs')
    t.match(await page.textContent('#top-pair'), /127\.0\.0\.31\s*\/categories\/MLA97994\s*12/, 'top IP + path pairs')
    t.match(await page.textContent('#top-rule'), /items-ip\s*3/, 'limited per rule')
    t.match(await page.textContent('#status-mix'), /2xx\s*17.*4xx\s*3/s, 'status mix')
    t.match(await page.textContent('#top-route'), /\/categories\/:id\s*12.*\/items\/:id\s*8/s, 'routes')
    t.match(await page.textContent('#workers'), /^2\/2 · 0$/, 'workers and restarts')
    t.match(await page.textContent('#rules-table'), /items-ip/, 'the rules in force')
    t.equal(await page.locator('#chart-rps polyline').count(), 1, 'the req/s chart is drawn')

    t.same(problems, [], 'no console errors while the page loads and refreshes')

    // A rule set the proxy must refuse (Chromium logs the 400 of that call), then one it must enforce.
    await page.click('#rules-editor summary')
    await page.fill('#rules-json', JSON.stringify({ limits: [{ name: 'cats', match: { path: '/categories/*' }, limit: 0, window: '1h' }] }))
    await page.fill('#token', TOKEN)
    await page.click('#rules-save')
    await page.waitForFunction(() => document.getElementById('rules-result')?.textContent?.startsWith('refused'), null, { timeout: 15_000 })
    t.match(await page.textContent('#rules-result'), /limit/, 'the refusal names the field')
    const cats = { limits: [{ name: 'cats', match: { path: '/categories/*' }, per: ['ip'], limit: 2, window: '1h' }] }
    await page.fill('#rules-json', JSON.stringify(cats))
    await page.click('#rules-save')
    await page.waitForFunction(() => document.getElementById('rules-result')?.textContent === 'saved as version 1', null, { timeout: 15_000 })
    await page.waitForFunction(() => /cats/.test(document.getElementById('rules-table')?.textContent ?? ''), null, { timeout: 15_000 })

    const after: number[] = []
    for (let i = 0; i < 3; i++) after.push((await send(`${proxy.url}/categories/MLA1`, { from: '127.0.0.33' })).status)
    t.same(after, [200, 200, 429], 'the proxy enforces the rule edited on the page')
    t.equal((await send(`${proxy.url}/items/MLA1`, { from: '127.0.0.32' })).status, 200, 'the old rule is gone')
    await page.waitForFunction(() => document.getElementById('total-requests')?.textContent === '24', null, { timeout: 30_000 })
    t.same(scriptErrors, [], 'no script errors')
    await page.close()
  })
}
