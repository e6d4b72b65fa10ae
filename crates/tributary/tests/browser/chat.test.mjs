// The chat page of realtime-chat-messages in headless Chromium, driven by playwright-core. Run
// by crates/tributary/tests/chat_page.rs, which starts the server and passes:
//   BASE_URL        the server
//   CHROMIUM        the browser (Debian's /usr/bin/chromium)
//   SCREENSHOT_DIR  where the screenshots go
// Two pages are two users: both join #general; ann sees bob come online, bob types and ann sees
// it, bob sends and ann sees the message live, ann answers and bob sees it; a reload of ann's
// page shows both from history, in order. Exits non-zero on the first failed check.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const BASE = process.env.BASE_URL;
const SHOTS = process.env.SCREENSHOT_DIR || os.tmpdir();
assert.ok(BASE, 'BASE_URL is required');

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tributary-chromium-'));
const step = (what) => console.log(`[chat] ${what}`);
const problems = [];

async function open(context, user) {
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`${user}: page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`${user}: console error: ${m.text()}`); });
  page.on('request', (r) => { if (!r.url().startsWith(BASE) && !r.url().startsWith(BASE.replace('http', 'ws')) && !r.url().startsWith('data:')) problems.push('external request: ' + r.url()); });
  await page.goto(BASE + '/chat');
  await page.fill('#user', user);
  await page.fill('#channel', 'general');
  await page.click('#join');
  await page.waitForFunction(() => (document.body.dataset.status || '').startsWith('Connected'), null, { timeout: 15000 });
  return page;
}

const texts = (page) => page.locator('#messages li:not(.system) .text').allTextContents();

let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1000, height: 700 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });

  step('ann and bob join #general');
  const ann = await open(context, 'ann');
  const bob = await open(context, 'bob');
  await ann.waitForSelector('#online li[data-user="bob"]', { timeout: 10000 });
  await bob.waitForSelector('#online li[data-user="ann"]', { timeout: 10000 });

  step('bob types: ann sees it');
  await bob.fill('#text', 'hello');
  await ann.waitForFunction(() => document.getElementById('typing').textContent.includes('bob is typing'), null, { timeout: 10000 });

  step('bob sends: ann sees it live');
  await bob.fill('#text', 'hello from bob');
  await bob.click('#send');
  await ann.waitForFunction(() => [...document.querySelectorAll('#messages li .text')].some((e) => e.textContent === 'hello from bob'), null, { timeout: 10000 });
  // The field is cleared when the send is answered, which may come after ann already has it.
  await bob.waitForFunction(() => document.getElementById('text').value === '', null, { timeout: 10000 });
  await ann.waitForFunction(() => document.getElementById('typing').textContent === '', null, { timeout: 10000 });

  step('ann answers: bob sees it live');
  await ann.fill('#text', 'hi bob <b>not bold</b>');
  await ann.press('#text', 'Enter');
  await bob.waitForFunction(() => [...document.querySelectorAll('#messages li .text')].some((e) => e.textContent === 'hi bob <b>not bold</b>'), null, { timeout: 10000 });
  assert.equal(await bob.locator('#messages b').count(), 0, 'message text is shown as text, never as markup');
  assert.deepEqual(await texts(bob), ['hello from bob', 'hi bob <b>not bold</b>']);
  const users = await bob.locator('#messages li:not(.system) .user').allTextContents();
  assert.deepEqual(users, ['bob', 'ann']);
  await ann.screenshot({ path: path.join(SHOTS, 'chat-ann.png'), fullPage: true });
  await bob.screenshot({ path: path.join(SHOTS, 'chat-bob.png'), fullPage: true });

  step('ann reloads: history in order');
  await ann.reload();
  await ann.fill('#user', 'ann');
  await ann.click('#join');
  await ann.waitForFunction(() => (document.body.dataset.status || '').startsWith('Connected'), null, { timeout: 15000 });
  assert.deepEqual(await texts(ann), ['hello from bob', 'hi bob <b>not bold</b>']);
  const seqs = await ann.locator('#messages li').evaluateAll((lis) => lis.map((li) => Number(li.dataset.seq)));
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), 'shown in seq order');

  step('bob sends again: the reloaded page gets it live');
  await bob.fill('#text', 'welcome back');
  await bob.click('#send');
  await ann.waitForFunction(() => [...document.querySelectorAll('#messages li .text')].some((e) => e.textContent === 'welcome back'), null, { timeout: 10000 });
  await ann.screenshot({ path: path.join(SHOTS, 'chat-ann-reloaded.png'), fullPage: true });

  assert.deepEqual(problems, [], 'no page errors, no console errors, no external requests');
  step('ok');
} finally {
  if (context) await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
