// The meliproxy dashboard: reads the admin API every 2 s and draws what it finds. No build step, no CDN.
'use strict'

const REFRESH_MS = 2000
const $ = (id) => document.getElementById(id)
let editing = false

function token() {
  return $('token').value || sessionStorage.getItem('meliproxy-token') || ''
}

async function api(path, init = {}) {
  const headers = Object.assign({ accept: 'application/json' }, init.headers || {})
  const t = token()
  if (t) headers.authorization = 'Bearer ' + t
  const res = await fetch(path, Object.assign({}, init, { headers }))
  const body = await res.json()
  if (!res.ok) {
    const err = new Error(body.message || res.statusText)
    err.status = res.status
    throw err
  }
  return body
}

const fmt = (n) => (n === null || n === undefined ? '–' : Number(n).toLocaleString('en-US', { maximumFractionDigits: 1 }))

function rows(table, header, list) {
  const el = $(table)
  el.textContent = ''
  const head = el.insertRow()
  for (const h of header) {
    const th = document.createElement('th')
    th.textContent = h
    head.appendChild(th)
  }
  for (const cells of list) {
    const tr = el.insertRow()
    cells.forEach((c, i) => {
      const td = tr.insertCell()
      td.textContent = typeof c === 'number' ? fmt(c) : c
      if (typeof c === 'number' && i > 0) td.className = 'n'
    })
  }
}

/** Draws lines (arrays of numbers or nulls, one per minute) into an SVG. */
function chart(id, lines, colors) {
  const svg = $(id)
  const w = 600
  const h = 160
  const max = Math.max(1, ...lines.flat().filter((v) => v !== null))
  const n = Math.max(2, ...lines.map((l) => l.length))
  let out = ''
  lines.forEach((line, k) => {
    const pts = []
    line.forEach((v, i) => {
      if (v !== null) pts.push(((i / (n - 1)) * w).toFixed(1) + ',' + (h - (v / max) * (h - 14)).toFixed(1))
    })
    out += '<polyline fill="none" stroke-width="2" stroke="' + colors[k] + '" points="' + pts.join(' ') + '"/>'
  })
  out += '<text x="4" y="12" font-size="11" fill="#5b6475">max ' + fmt(max) + '</text>'
  svg.innerHTML = out
}

function showError(err) {
  const el = $('error')
  if (err === null) {
    el.hidden = true
    return
  }
  el.hidden = false
  el.textContent = err.status === 401 ? 'this admin listener needs the token: enter it in the rules editor' : 'API: ' + err.message
}

async function refreshStats() {
  const q = 'from=now-1h&limit=10'
  const [byRoute, byPath, byIp, byPair, byRule] = await Promise.all([
    api('/api/stats?' + q + '&group=route'),
    api('/api/stats?' + q + '&group=path'),
    api('/api/stats?' + q + '&group=ip'),
    api('/api/stats?' + q + '&group=pair'),
    api('/api/stats?' + q + '&group=rule'),
  ])
  const t = byRoute.totals
  $('total-requests').textContent = fmt(t.requests)
  const series = byRoute.series
  const last = series[series.length - 1]
  let rps = 0
  if (last) {
    const start = Date.parse(last.time)
    const elapsed = Math.min(60, Math.max(1, (Date.now() - start) / 1000))
    rps = last.requests / elapsed
  }
  $('current-rps').textContent = fmt(rps)
  const c = t.cache
  const lookups = (c.HIT || 0) + (c.STALE || 0) + (c.MISS || 0)
  $('hit-ratio').textContent = lookups === 0 ? '–' : (((c.HIT || 0) + (c.STALE || 0)) / lookups * 100).toFixed(1) + '%'
  $('limited').textContent = fmt(t.limited)
  $('would-limit').textContent = fmt(t.wouldLimit || 0)
  $('latency').textContent = fmt(t.p50Ms) + ' / ' + fmt(t.p99Ms) + ' ms'
  rows('status-mix', ['status', 'requests'], Object.entries(t.status).sort())
  rows('top-route', ['route', 'requests'], byRoute.top.map((r) => [r.key, r.requests]))
  rows('top-path', ['path', 'requests'], byPath.top.map((r) => [r.key, r.requests]))
  rows('top-ip', ['client IP', 'requests'], byIp.top.map((r) => [r.key, r.requests]))
  rows('top-pair', ['IP', 'path', 'requests'], byPair.top.map((r) => [r.ip, r.path, r.requests]))
  // A shadow rule's entries (`shadow:<rule>`) are requests it would have limited; none was.
  const ruleLabel = (key) => (key.startsWith('shadow:') ? key.slice(7) + ' (shadow: would limit)' : key)
  rows('top-rule', ['rule', 'limited'], byRule.top.map((r) => [ruleLabel(r.key), r.requests]))
  // One point per minute of the last hour, gaps as zero traffic.
  const now = Date.now()
  const first = now - (now % 60000) - 59 * 60000
  const perMinute = new Map(series.map((p) => [Date.parse(p.time), p]))
  const rpsLine = []
  const p50 = []
  const p99 = []
  for (let m = first; m <= now; m += 60000) {
    const p = perMinute.get(m)
    rpsLine.push(p ? p.requests / 60 : 0)
    p50.push(p ? p.p50Ms : null)
    p99.push(p ? p.p99Ms : null)
  }
  chart('chart-rps', [rpsLine], ['#2b6cb0'])
  chart('chart-latency', [p50, p99], ['#2b6cb0', '#dd6b20'])
}

async function refreshStatus() {
  const s = await api('/api/status')
  $('status-line').textContent =
    'v' + s.version + ' · up ' + fmt(s.uptimeSeconds) + ' s · upstream ' + s.upstream + ' · rules v' + s.rules.version
  $('workers').textContent = s.workers.listening + '/' + s.workers.desired + ' · ' + s.workers.restarts
  const redisDetail = s.redis.mode === 'cluster'
    ? 'cluster, ' + s.redis.masters.filter((m) => m.state === 'ready').length + ' of ' + s.redis.masters.length + ' masters ready'
    : s.redis.role
  $('redis').textContent = s.redis.configured ? s.redis.state + (redisDetail ? ' (' + redisDetail + ')' : '') : 'not used'
  $('leases').textContent = s.limiter
    ? fmt(s.limiter.leases) + ' · ' + fmt(s.limiter.returnedTokens) + ' · ' + fmt(s.limiter.redisCalls)
    : '–'
  const open = s.routeBreakers.open
  $('breakers').textContent =
    'upstream ' + s.upstreamBreaker.state + ' · ' + (open.length === 0 ? 'no route open' : 'open: ' + open.join(', '))
}

async function refreshRules() {
  const r = await api('/api/limits')
  $('rules-version').textContent = 'v' + r.version + ' (' + r.source + ')'
  rows(
    'rules-table',
    ['name', 'match', 'per', 'limit', 'window', 'algorithm', 'mode', 'cost', 'on exceed', 'redis down'],
    r.limits.map((l) => [
      l.name,
      JSON.stringify(l.match || {}),
      (l.per || []).join(', '),
      l.limit,
      l.window,
      (l.algorithm || 'fixed') + (l.burst ? ' (burst ' + l.burst + ')' : ''),
      l.mode || 'enforce',
      typeof l.cost === 'object' ? l.cost.header + ' (max ' + l.cost.max + ')' : String(l.cost || 1),
      l.onExceed === 'delay' ? 'delay ' + l.maxDelay : 'reject',
      l.whenRedisDown || 'local',
    ]),
  )
  if (!editing) $('rules-json').value = JSON.stringify({ limits: r.limits, allow: r.allow, deny: r.deny }, null, 2)
}

async function refresh() {
  try {
    await Promise.all([refreshStats(), refreshStatus(), refreshRules()])
    showError(null)
  } catch (err) {
    showError(err)
  }
}

$('rules-json').addEventListener('input', () => (editing = true))
$('rules-save').addEventListener('click', async () => {
  const out = $('rules-result')
  let body
  try {
    body = JSON.parse($('rules-json').value)
  } catch (err) {
    out.textContent = 'not JSON: ' + err.message
    return
  }
  try {
    const v = await api('/api/limits', { method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
    sessionStorage.setItem('meliproxy-token', $('token').value)
    out.textContent = 'saved as version ' + v.version
    editing = false
    await refreshRules()
  } catch (err) {
    out.textContent = 'refused: ' + err.message
  }
})

refresh()
setInterval(refresh, REFRESH_MS)
