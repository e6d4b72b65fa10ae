// The dashboard in headless Chromium, driven by playwright-core. Run by
// crates/tributary/tests/dashboard.rs, which starts the servers and passes:
//   BASE_URL        a server without tokens
//   TOKEN_BASE_URL  a server in tokens mode, ACCESS_TOKEN its token
//   CHROMIUM        the browser (Debian's /usr/bin/chromium)
//   SCREENSHOT_DIR  where the screenshots go
// Exits non-zero on the first failed check.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const BASE = process.env.BASE_URL;
const TOKEN_BASE = process.env.TOKEN_BASE_URL;
const TOKEN = process.env.ACCESS_TOKEN;
const SHOTS = process.env.SCREENSHOT_DIR || os.tmpdir();
assert.ok(BASE, 'BASE_URL is required');

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tributary-chromium-'));
const step = (what) => console.log(`[dashboard] ${what}`);

async function pollsAtLeast(page, n) {
  await page.waitForFunction((k) => Number(document.body.dataset.polls || 0) >= k, n, { timeout: 15000 });
}

let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push('page error: ' + e.message));
  page.on('console', (m) => { if (m.type() === 'error') problems.push('console error: ' + m.text()); });
  // Offline: the page must ask for nothing but its own server.
  page.on('request', (r) => { if (!r.url().startsWith(BASE) && !r.url().startsWith('data:')) problems.push('external request: ' + r.url()); });

  // ---- the overview ---------------------------------------------------------------------
  step('overview');
  await page.goto(BASE + '/');
  await page.waitForSelector('table.systems tbody tr');
  const rows = page.locator('table.systems tbody tr');
  assert.equal(await rows.count(), 35, 'every one of the 35 systems is listed');
  assert.equal(await page.locator('#count-all').textContent(), '35');
  // The implemented systems, as the server lists them (more arrive as systems are built).
  const implemented = await page.evaluate(async () => (await (await fetch('/v1/dashboard')).json()).systems.filter((s) => s.implemented).map((s) => s.id));
  for (const id of ['basic-message-queue', 'simple-pubsub']) assert.ok(implemented.includes(id), `${id} is implemented`);
  for (const id of implemented) {
    const row = page.locator(`tr[data-id="${id}"]`);
    assert.equal((await row.locator('td.status').textContent()).trim(), 'implemented', `${id} says implemented`);
    assert.ok((await row.locator('.tier').count()) > 0, `${id} shows its tier checks`);
    assert.match(await row.locator('.tiers').textContent(), /✓ T0/, `${id} passes T0`);
  }
  // Implemented systems come first, in their own table.
  const firstIds = await rows.evaluateAll((trs, n) => trs.slice(0, n).map((tr) => tr.dataset.id), implemented.length);
  assert.deepEqual(firstIds.sort(), [...implemented].sort());
  const notYet = page.locator('tr.notyet');
  assert.equal(await notYet.count(), 35 - implemented.length);
  assert.equal((await notYet.first().locator('td.status').textContent()).trim(), 'not yet');
  // Rates appear once two polls have been differenced; counters are numbers.
  await pollsAtLeast(page, 3);
  const bmq = page.locator('tr[data-id="basic-message-queue"]');
  for (const cell of ['td.rate-in', 'td.rate-out', 'td.errors', 'td.conns']) {
    const text = (await bmq.locator(cell).textContent()).trim();
    assert.match(text, /^\d[\d,]*(\.\d+)?/, `${cell} shows a number, got "${text}"`);
  }
  assert.match(await page.locator('#gateway').textContent(), /Gateway: \d+ of \d+ connections/);
  assert.match(await bmq.locator('.lat .target').textContent(), /^P\d+ < /, 'the latency target is shown');
  await page.screenshot({ path: path.join(SHOTS, 'overview.png'), fullPage: true });

  // ---- one system ------------------------------------------------------------------------
  step('basic-message-queue');
  await bmq.locator('th a').click();
  await page.waitForURL('**/systems/basic-message-queue');
  await page.waitForSelector('svg#topology g.node');
  const topology = await page.evaluate(async () => (await (await fetch('/v1/dashboard')).json()).systems.find((s) => s.id === 'basic-message-queue').topology);
  const nodeNames = await page.locator('svg#topology g.node').evaluateAll((gs) => gs.map((g) => g.dataset.name));
  assert.deepEqual(nodeNames.sort(), topology.components.map((c) => c.name).sort(), 'one box per component');
  const svgText = await page.locator('svg#topology').textContent();
  for (const c of topology.components) assert.ok(svgText.includes(c.name.slice(0, 12)), `the SVG labels ${c.name}`);
  const arrows = page.locator('svg#topology path.edge[marker-end="url(#arrow)"]');
  assert.equal(await arrows.count(), topology.connections.length, 'one arrow per connection');
  for (const c of topology.connections) {
    assert.equal(await page.locator(`svg#topology g.connection[data-from="${c.from}"][data-to="${c.to}"]`).count(), 1, `arrow ${c.from} → ${c.to}`);
  }
  // Left to right by longest path: the producers are left of the queue, the queue left of the consumers.
  const xOf = async (name) => (await page.locator(`svg#topology g.node[data-name="${name}"]`).boundingBox()).x;
  assert.ok((await xOf('Producers')) < (await xOf('Queue')) && (await xOf('Queue')) < (await xOf('Consumers')), 'laid out left to right');
  // Kinds colour the boxes differently.
  const fill = (kind) => page.locator(`svg#topology g.node[data-kind="${kind}"] rect`).first().evaluate((r) => getComputedStyle(r).fill);
  assert.notEqual(await fill('client'), await fill('queue'));
  assert.match(await page.locator('#checks-summary').textContent(), /✓ \d+ of \d+ tiers hold/);
  assert.match(await page.locator('#targets').textContent(), /P\d+ < /);
  const before = Number(await page.evaluate(() => document.body.dataset.polls));
  await pollsAtLeast(page, before + 2);
  for (const id of ['#rate-in', '#rate-out', '#total-in', '#total-out', '#errors', '#connections']) {
    assert.match((await page.locator(id).textContent()).trim(), /^\d/, `${id} is a number`);
  }
  assert.match(await page.locator('#topology-caption').textContent(), /^Live: in \d/);
  await page.screenshot({ path: path.join(SHOTS, 'basic-message-queue.png'), fullPage: true });

  // ---- live numbers: the page differences successive polls -----------------------------
  // No publish route exists yet, so the server's counters stay at zero; a routed copy of the
  // real response with counters that grow 50 per poll (and a status with queues) proves the
  // rates, the over-target colouring and the status table.
  step('live rates (routed)');
  let polls = 0;
  await page.route('**/v1/dashboard*', async (route) => {
    const response = await route.fetch();
    const data = await response.json();
    const s = data.systems.find((x) => x.id === 'basic-message-queue');
    polls += 1;
    s.metrics = {
      messages_in: 50 * polls, messages_out: 40 * polls, errors: 2,
      latency_ms: { samples: 100, p50: 1, p95: s.latency_target.ms * 2, p99: s.latency_target.ms * 3, max: s.latency_target.ms * 4 },
    };
    s.status = { queues: { orders: { depth: 12, in_flight: 3, lag: 7 }, 'orders.dlq': { depth: 1, in_flight: 0, lag: 0 } }, consumers: 3 };
    await route.fulfill({ response, json: data });
  });
  const mark = polls;
  await page.waitForFunction(() => Number(document.getElementById('rate-in')?.textContent.replace(/,/g, '')) > 0, null, { timeout: 15000 });
  // Two routed polls 1 s apart: 50 more messages in, so about 50 per second.
  await pollsAtLeast(page, Number(await page.evaluate(() => document.body.dataset.polls)) + 1);
  assert.ok(polls >= mark + 2, `routed polls ${polls}`);
  const rateIn = Number((await page.locator('#rate-in').textContent()).replace(/,/g, ''));
  assert.ok(rateIn > 20 && rateIn < 150, `in rate from differencing, got ${rateIn}`);
  assert.ok((await page.locator('dd.over').count()) >= 1, 'a percentile over the target is coloured');
  const statusText = await page.locator('#status').textContent();
  for (const word of ['queues', 'orders', 'depth', 'in flight', 'lag', 'consumers']) assert.ok(statusText.includes(word), `status table shows ${word}`);
  assert.equal(await page.locator('#status table th[scope="row"]', { hasText: 'orders.dlq' }).count(), 1);
  await page.screenshot({ path: path.join(SHOTS, 'basic-message-queue-live.png'), fullPage: true });
  await page.goto(BASE + '/');
  await page.waitForFunction(() => Number(document.querySelector('tr[data-id="basic-message-queue"] td.rate-in .v')?.textContent.replace(/,/g, '')) > 0, null, { timeout: 15000 });
  assert.ok((await page.locator('tr[data-id="basic-message-queue"] .lat .over').count()) >= 1, 'over-target latency coloured on the overview');
  await page.screenshot({ path: path.join(SHOTS, 'overview-live.png'), fullPage: true });
  await page.unroute('**/v1/dashboard*');

  // ---- a system not implemented yet: the seed's reference, marked -----------------------
  step('reference topology');
  const other = await page.evaluate(async () => (await (await fetch('/v1/dashboard')).json()).systems.find((s) => !s.implemented));
  await page.goto(BASE + '/systems/' + other.id);
  await page.waitForSelector('svg#topology');
  assert.match(await page.locator('#reference-notice').textContent(), /seed's reference topology/);
  assert.equal(await page.locator('svg#topology g.node').count(), other.topology.components.length);
  assert.equal(await page.locator('svg#topology path.edge').count(), other.topology.connections.length);
  await page.screenshot({ path: path.join(SHOTS, 'reference.png'), fullPage: true });

  // ---- a narrow screen ---------------------------------------------------------------------
  step('narrow screen');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(BASE + '/');
  await page.waitForSelector('table.systems tbody tr');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no sideways scrolling on a phone, overflow ${overflow}px`);
  await page.screenshot({ path: path.join(SHOTS, 'overview-narrow.png') });
  await page.setViewportSize({ width: 1280, height: 900 });

  assert.deepEqual(problems, [], 'no page errors and no external requests');

  // ---- tokens mode: ?access_token= reaches the fetches and the links --------------------
  if (TOKEN_BASE) {
    step('tokens mode');
    const tpage = await context.newPage();
    await tpage.goto(TOKEN_BASE + '/');
    assert.equal((await tpage.request.get(TOKEN_BASE + '/v1/dashboard')).status(), 401, 'tokens mode needs a token');
    await tpage.goto(`${TOKEN_BASE}/?access_token=${encodeURIComponent(TOKEN)}`);
    await tpage.waitForSelector('table.systems tbody tr');
    assert.equal(await tpage.locator('table.systems tbody tr').count(), 35);
    const href = await tpage.locator('tr[data-id="simple-pubsub"] th a').getAttribute('href');
    assert.equal(href, `/systems/simple-pubsub?access_token=${encodeURIComponent(TOKEN)}`);
    await tpage.locator('tr[data-id="simple-pubsub"] th a').click();
    await tpage.waitForSelector('svg#topology g.node');
    assert.ok(await tpage.locator('#error').isHidden());
  }
  step('all checks passed; screenshots in ' + SHOTS);
} catch (error) {
  console.error('[dashboard] FAILED:', error && error.stack ? error.stack : error);
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
