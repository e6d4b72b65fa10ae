// The Tributary dashboard. Polls /v1/dashboard every second; rates are the difference between
// two successive polls' cumulative counters divided by the time between them.
'use strict';

const POLL_MS = 1000;
const KINDS = ['client', 'lb', 'app', 'stream', 'queue', 'worker', 'cache', 'db_primary', 'db_replica', 'search', 'cdn'];

const token = new URLSearchParams(location.search).get('access_token');
/** `path` with the access token passed through, when the page was given one. */
function withToken(path) {
  if (!token) return path;
  return path + (path.includes('?') ? '&' : '?') + 'access_token=' + encodeURIComponent(token);
}

const route = (() => {
  const m = location.pathname.match(/^\/systems\/([^/]+)\/?$/);
  return m ? { view: 'system', id: decodeURIComponent(m[1]) } : { view: 'overview' };
})();

let previous = null; // { at, systems: Map(id -> metrics) }
const rates = new Map(); // id -> { in, out, errors } per second

// ---- small helpers ------------------------------------------------------------------------

const esc = (v) => String(v).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const $ = (id) => document.getElementById(id);

function fmtInt(n) { return n == null ? '—' : Number(n).toLocaleString('en-US'); }
function fmtRate(r) {
  if (r == null) return '—';
  return r >= 100 ? Math.round(r).toLocaleString('en-US') : r.toFixed(1);
}
function fmtMs(ms) {
  if (ms == null) return '—';
  if (ms >= 1000) return (ms / 1000).toFixed(2) + ' s';
  if (ms >= 10) return ms.toFixed(0) + ' ms';
  return ms.toFixed(2) + ' ms';
}
function fmtTarget(t) { return t ? `P${t.percentile} < ${fmtMs(t.ms)}` : 'no target'; }
function human(key) { return String(key).replace(/_/g, ' '); }

/** The measured percentile to hold against a target at `percentile` (the nearest at or above). */
function targetField(percentile) {
  if (percentile <= 50) return 'p50';
  if (percentile <= 95) return 'p95';
  return 'p99';
}

/** 'over' / 'under' for one percentile field against the system's latency target. */
function latencyClass(system, field) {
  const t = system.latency_target;
  const lat = system.metrics && system.metrics.latency_ms;
  if (!t || !lat || !lat.samples || targetField(t.percentile) !== field) return '';
  return lat[field] > t.ms ? 'over' : 'under';
}

function updateRates(data) {
  const now = performance.now();
  const current = new Map();
  for (const s of data.systems) if (s.metrics) current.set(s.id, s.metrics);
  if (previous) {
    const dt = (now - previous.at) / 1000;
    for (const [id, m] of current) {
      const p = previous.systems.get(id);
      if (!p || dt <= 0) continue;
      rates.set(id, {
        in: Math.max(0, m.messages_in - p.messages_in) / dt,
        out: Math.max(0, m.messages_out - p.messages_out) / dt,
        errors: Math.max(0, m.errors - p.errors) / dt,
      });
    }
  }
  previous = { at: now, systems: current };
}

function checksHtml(checks) {
  if (!checks) return '<span class="muted">—</span>';
  const tiers = checks.tiers.map((t) =>
    `<span class="tier ${t.holds ? 'ok' : 'bad'}" title="${esc(t.title)}: ${t.holds ? 'holds' : 'does not hold'}">` +
    `${t.holds ? '✓' : '✗'} ${esc(t.name)}</span>`).join('');
  return `<span class="tiers" aria-label="${checks.tiers.filter((t) => t.holds).length} of ${checks.tiers.length} tiers hold">${tiers}</span>`;
}

function latencyHtml(s) {
  const lat = s.metrics && s.metrics.latency_ms;
  const target = `<span class="target">${esc(fmtTarget(s.latency_target))}</span>`;
  if (!lat || !lat.samples) return `<span class="lat"><span class="muted">no samples</span>${target}</span>`;
  const part = (f) => `<span class="${latencyClass(s, f)}" data-field="${f}">${fmtMs(lat[f])}</span>`;
  return `<span class="lat">${part('p50')} / ${part('p95')} / ${part('p99')}${target}</span>`;
}

function statusBadge(s) {
  return s.implemented
    ? '<span class="badge implemented">implemented</span>'
    : '<span class="badge notyet">not yet</span>';
}

function systemLink(s) { return withToken('/systems/' + encodeURIComponent(s.id)); }

// ---- overview -----------------------------------------------------------------------------

function systemsTable(systems, data, caption) {
  const rows = systems.map((s) => {
    const r = rates.get(s.id);
    const m = s.metrics;
    const conns = data.gateway.by_system[s.id];
    return `<tr class="${s.implemented ? 'implemented' : 'notyet'}" data-id="${esc(s.id)}">
      <td class="num" data-label="#">${s.number}</td>
      <th scope="row" data-label="System"><a href="${esc(systemLink(s))}">${esc(s.title)}</a><br><small class="muted">${esc(s.id)} · ${esc(s.category)}</small></th>
      <td data-label="Status" class="status">${statusBadge(s)}</td>
      <td data-label="Checks">${checksHtml(s.checks)}</td>
      <td class="num rate-in" data-label="In /s"><span class="v">${m ? fmtRate(r ? r.in : null) : '—'}</span>${s.rate_target_per_s ? `<br><small class="muted">target ${fmtInt(s.rate_target_per_s)}</small>` : ''}</td>
      <td class="num rate-out" data-label="Out /s"><span class="v">${m ? fmtRate(r ? r.out : null) : '—'}</span></td>
      <td data-label="Latency p50 / p95 / p99">${latencyHtml(s)}</td>
      <td class="num errors ${m && m.errors ? 'bad' : ''}" data-label="Errors">${m ? fmtInt(m.errors) : '—'}</td>
      <td class="num conns" data-label="Connections">${m ? fmtInt(conns || 0) : '—'}</td>
    </tr>`;
  }).join('');
  return `<table class="systems"><caption>${esc(caption)}</caption>
    <thead><tr><th scope="col">#</th><th scope="col">System</th><th scope="col">Status</th><th scope="col">Checks (tiers)</th>
    <th scope="col" class="num">In /s</th><th scope="col" class="num">Out /s</th><th scope="col">Latency p50 / p95 / p99</th>
    <th scope="col" class="num">Errors</th><th scope="col" class="num">Conns</th></tr></thead>
    <tbody>${rows}</tbody></table>`;
}

function renderOverview(data) {
  document.title = 'Tributary — systems';
  const implemented = data.systems.filter((s) => s.implemented);
  const notYet = data.systems.filter((s) => !s.implemented);
  const failing = implemented.filter((s) => s.checks && !s.checks.holds).length;
  $('view').innerHTML = `
    <h1>Streaming systems</h1>
    <ul class="summary" id="summary">
      <li><strong id="count-all">${data.systems.length}</strong> systems</li>
      <li><strong id="count-implemented">${implemented.length}</strong> implemented</li>
      <li><strong>${notYet.length}</strong> not yet</li>
      <li>${failing ? `<strong class="bad">${failing}</strong> failing their checks` : '<span class="ok">every implemented system passes its checks</span>'}</li>
    </ul>
    <section aria-labelledby="h-impl"><h2 id="h-impl">Implemented</h2>
      ${systemsTable(implemented, data, 'Implemented systems, with live throughput, latency against the seed target, errors and gateway connections')}</section>
    <section aria-labelledby="h-notyet"><h2 id="h-notyet">Not yet implemented</h2>
      ${systemsTable(notYet, data, 'Systems of the seed not implemented yet (their pages show the seed\'s reference topology)')}</section>`;
}

// ---- one system ---------------------------------------------------------------------------

/** Columns left to right by longest path from the sources; back edges of cycles set aside. */
function layout(topology) {
  const names = topology.components.map((c) => c.name);
  const index = new Map(names.map((n, i) => [n, i]));
  const out = names.map(() => []);
  const indeg = names.map(() => 0);
  for (const c of topology.connections) {
    if (!index.has(c.from) || !index.has(c.to)) continue;
    out[index.get(c.from)].push(index.get(c.to));
    indeg[index.get(c.to)]++;
  }
  // Depth-first from the sources (then from whatever is left) marks the edges that close cycles.
  const state = names.map(() => 0); // 0 new, 1 on stack, 2 done
  const back = new Set();
  const visit = (u) => {
    state[u] = 1;
    for (const v of out[u]) {
      if (state[v] === 1) back.add(u + '>' + v);
      else if (state[v] === 0) visit(v);
    }
    state[u] = 2;
  };
  names.forEach((_, i) => { if (indeg[i] === 0 && state[i] === 0) visit(i); });
  names.forEach((_, i) => { if (state[i] === 0) visit(i); });
  // Longest path over the remaining acyclic graph (Kahn's order).
  const forward = names.map((_, u) => out[u].filter((v) => !back.has(u + '>' + v)));
  const deg = names.map(() => 0);
  forward.forEach((vs) => vs.forEach((v) => deg[v]++));
  const col = names.map(() => 0);
  const queue = names.map((_, i) => i).filter((i) => deg[i] === 0);
  while (queue.length) {
    const u = queue.shift();
    for (const v of forward[u]) {
      col[v] = Math.max(col[v], col[u] + 1);
      if (--deg[v] === 0) queue.push(v);
    }
  }
  // Rows: declaration order, then one pass ordering each column by its predecessors' rows.
  const columns = [];
  names.forEach((_, i) => { (columns[col[i]] = columns[col[i]] || []).push(i); });
  const row = names.map(() => 0);
  columns.forEach((members, c) => {
    if (c > 0) {
      const key = (i) => {
        const preds = names.map((_, u) => u).filter((u) => forward[u].includes(i));
        return preds.length ? preds.reduce((a, u) => a + row[u], 0) / preds.length : row[i];
      };
      members.sort((a, b) => key(a) - key(b) || a - b);
    }
    members.forEach((i, r) => { row[i] = r; });
  });
  return { col, row, columns, back, index };
}

/** Numeric figures the system's status reports under a component's name, if any. */
function componentFigures(status, name) {
  if (!status || typeof status !== 'object') return null;
  const lname = name.toLowerCase();
  const candidates = [status, ...Object.values(status).filter((v) => v && typeof v === 'object' && !Array.isArray(v))];
  for (const obj of candidates) {
    for (const [k, v] of Object.entries(obj)) {
      if (k.toLowerCase() === lname && v && typeof v === 'object' && !Array.isArray(v)) {
        const nums = Object.entries(v).filter(([, x]) => typeof x === 'number').slice(0, 3);
        if (nums.length) return nums.map(([kk, x]) => `${human(kk)} ${fmtInt(x)}`).join(' · ');
      }
    }
  }
  return null;
}

function wrapName(name, max) {
  if (name.length <= max) return [name];
  const words = name.split(' ');
  const lines = [''];
  for (const w of words) {
    const cur = lines[lines.length - 1];
    if (cur && (cur + ' ' + w).length > max) lines.push(w); else lines[lines.length - 1] = cur ? cur + ' ' + w : w;
  }
  return lines.slice(0, 2).map((l, i, a) => (i === 1 && lines.length > 2 ? l.slice(0, max - 1) + '…' : l.length > max ? l.slice(0, max - 1) + '…' : l));
}

function topologySvg(s) {
  const t = s.topology;
  const { col, row, columns, back, index } = layout(t);
  const W = 160, H = 62, GX = 80, GY = 34, PAD = 24, TOP = 28;
  const rowsMax = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  const width = PAD * 2 + columns.length * W + (columns.length - 1) * GX;
  const height = TOP + PAD * 2 + rowsMax * H + (rowsMax - 1) * GY + 40;
  const x = (i) => PAD + col[i] * (W + GX);
  const y = (i) => {
    const n = columns[col[i]].length;
    const offset = ((rowsMax - n) * (H + GY)) / 2;
    return TOP + PAD + offset + row[i] * (H + GY);
  };
  const r = rates.get(s.id);
  const live = s.implemented && s.metrics;
  const edges = t.connections.filter((c) => index.has(c.from) && index.has(c.to)).map((c) => {
    const a = index.get(c.from), b = index.get(c.to);
    const isBack = back.has(a + '>' + b) || col[b] <= col[a];
    let d, lx, ly;
    if (!isBack) {
      const x1 = x(a) + W, y1 = y(a) + H / 2, x2 = x(b) - 2, y2 = y(b) + H / 2;
      const mx = (x1 + x2) / 2;
      d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`;
      lx = mx; ly = (y1 + y2) / 2 - 6;
    } else {
      // A loop back: leave from the bottom of the source, come into the bottom of the target.
      const x1 = x(a) + W / 2 + 12, y1 = y(a) + H, x2 = x(b) + W / 2 - 12, y2 = y(b) + H + 2;
      const dip = Math.max(y1, y2) + 34;
      d = `M${x1},${y1} C${x1},${dip} ${x2},${dip} ${x2},${y2}`;
      lx = (x1 + x2) / 2; ly = dip;
    }
    let label = '';
    if (live) {
      const kindFrom = t.components[a].kind, kindTo = t.components[b].kind;
      if (kindFrom === 'client') label = `in ${fmtRate(r ? r.in : null)}/s`;
      else if (kindTo === 'worker' && !isBack) label = `out ${fmtRate(r ? r.out : null)}/s`;
    }
    return `<g class="connection" data-from="${esc(c.from)}" data-to="${esc(c.to)}">
      <title>${esc(c.from)} → ${esc(c.to)}</title>
      <path class="edge${isBack ? ' back' : ''}" d="${d}" marker-end="url(#arrow)"></path>
      ${label ? `<text class="edge-label" x="${lx}" y="${ly}" text-anchor="middle">${esc(label)}</text>` : ''}</g>`;
  }).join('');
  const nodes = t.components.map((c, i) => {
    const lines = wrapName(c.name, 20);
    const extra = [];
    if (c.params && c.params.replicas) extra.push('×' + c.params.replicas);
    if (c.params && c.params.partitions) extra.push(c.params.partitions + ' partitions');
    const figures = live ? componentFigures(s.status, c.name) : null;
    const nameY = lines.length === 1 ? 24 : 18;
    return `<g class="node kind-${esc(c.kind)}" data-name="${esc(c.name)}" data-kind="${esc(c.kind)}" transform="translate(${x(i)},${y(i)})">
      <title>${esc(c.name)} (${esc(c.kind)}${extra.length ? ', ' + esc(extra.join(', ')) : ''})</title>
      <rect width="${W}" height="${H}" rx="8" style="fill:var(--k-${esc(c.kind)},#fff);stroke:var(--s-${esc(c.kind)},#555)"></rect>
      ${lines.map((l, k) => `<text class="name" x="${W / 2}" y="${nameY + k * 15}" text-anchor="middle">${esc(l)}</text>`).join('')}
      <text class="kind" x="${W / 2}" y="${H - 8}" text-anchor="middle">${esc(c.kind)}${extra.length ? ' · ' + esc(extra.join(' · ')) : ''}</text>
      ${figures ? `<text class="live" x="${W / 2}" y="${H + 14}" text-anchor="middle">${esc(figures)}</text>` : ''}</g>`;
  }).join('');
  let caption = s.implemented ? 'Live' : 'Reference topology from the seed: not implemented yet';
  if (live) {
    const lat = s.metrics.latency_ms;
    caption = `Live: in ${fmtRate(r ? r.in : null)}/s · out ${fmtRate(r ? r.out : null)}/s · ` +
      (lat && lat.samples ? `p50 ${fmtMs(lat.p50)} · p95 ${fmtMs(lat.p95)} · p99 ${fmtMs(lat.p99)}` : 'no latency samples') +
      ` · errors ${fmtInt(s.metrics.errors)}`;
  }
  const desc = t.connections.map((c) => `${c.from} to ${c.to}`).join('; ');
  return `<svg id="topology" viewBox="0 0 ${width} ${height}" role="img" aria-labelledby="topo-title topo-desc">
    <title id="topo-title">Topology of ${esc(s.title)}${s.implemented ? '' : ' (seed reference)'}</title>
    <desc id="topo-desc">${t.components.length} components; connections: ${esc(desc)}</desc>
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse">
      <path d="M0,0 L10,5 L0,10 z" fill="#64748b"></path></marker></defs>
    <text class="edge-label" id="topology-caption" x="${PAD}" y="${PAD}">${esc(caption)}</text>
    ${edges}${nodes}</svg>`;
}

function legendHtml(topology) {
  const used = new Set(topology.components.map((c) => c.kind));
  return `<ul class="legend" aria-label="Component kinds">${KINDS.filter((k) => used.has(k)).map((k) =>
    `<li style="--f:var(--k-${k});--s:var(--s-${k})">${esc(k)}</li>`).join('')}</ul>`;
}

/** A system's `status` JSON as tables: objects as key/value rows, maps and lists of objects as grids. */
function statusHtml(value, caption) {
  if (value == null) return '';
  const prim = (v) => v === null || typeof v !== 'object';
  const cell = (v) => (prim(v) ? (typeof v === 'number' ? `<td class="num">${fmtInt(v)}</td>` : `<td>${esc(v)}</td>`)
    : `<td><code>${esc(JSON.stringify(v))}</code></td>`);
  const grid = (rows, keyName, cap) => {
    const cols = [];
    rows.forEach(([, obj]) => Object.keys(obj).forEach((k) => { if (!cols.includes(k)) cols.push(k); }));
    return `<table class="status-table"><caption>${esc(human(cap))}</caption><thead><tr>${keyName != null ? `<th scope="col">${esc(keyName)}</th>` : ''}${cols.map((c) => `<th scope="col"${rows.every(([, o]) => !(c in o) || typeof o[c] === 'number') ? ' class="num"' : ''}>${esc(human(c))}</th>`).join('')}</tr></thead>
      <tbody>${rows.map(([k, obj]) => `<tr>${keyName != null ? `<th scope="row">${esc(k)}</th>` : ''}${cols.map((c) => (c in obj ? cell(obj[c]) : '<td></td>')).join('')}</tr>`).join('')}</tbody></table>`;
  };
  if (prim(value)) return `<p>${esc(value)}</p>`;
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v && typeof v === 'object' && !Array.isArray(v))) {
      const keyCol = ['name', 'id', 'topic', 'queue', 'subject'].find((k) => value.every((v) => k in v));
      const rows = value.map((v) => { if (!keyCol) return [null, v]; const { [keyCol]: k, ...rest } = v; return [k, rest]; });
      return grid(rows, keyCol ? keyCol : null, caption);
    }
    return `<table class="status-table"><caption>${esc(human(caption))}</caption><tbody>${value.map((v) => `<tr>${cell(v)}</tr>`).join('')}</tbody></table>`;
  }
  const entries = Object.entries(value);
  const scalars = entries.filter(([, v]) => prim(v) || (Array.isArray(v) && v.every(prim)));
  const nested = entries.filter(([, v]) => !(prim(v) || (Array.isArray(v) && v.every(prim))));
  let html = '';
  if (scalars.length) {
    html += `<table class="status-table"><caption>${esc(human(caption))}</caption><tbody>${scalars.map(([k, v]) =>
      `<tr><th scope="row">${esc(human(k))}</th>${Array.isArray(v) ? `<td>${esc(v.join(', '))}</td>` : cell(v)}</tr>`).join('')}</tbody></table>`;
  }
  for (const [k, v] of nested) {
    const inner = Array.isArray(v) ? null : Object.values(v);
    if (inner && inner.length && inner.every((x) => x && typeof x === 'object' && !Array.isArray(x) && Object.values(x).every(prim))) {
      html += grid(Object.entries(v), 'name', k); // a map of named things: queues, topics, subscriptions
    } else {
      html += statusHtml(v, k);
    }
  }
  return html;
}

function checksDetailHtml(checks) {
  if (!checks) return '<p class="muted">Not checked: the system is not implemented yet.</p>';
  const holding = checks.tiers.filter((t) => t.holds).length;
  return `<p id="checks-summary" class="${checks.holds ? 'ok' : 'bad'}">${checks.holds ? '✓' : '✗'} ${holding} of ${checks.tiers.length} tiers hold</p>
    ${checks.tiers.map((t) => `<h3><span class="${t.holds ? 'ok' : 'bad'}">${t.holds ? '✓' : '✗'}</span> ${esc(t.name)} ${esc(t.title)}</h3>
      <ul class="rules">${t.rules.map((r) => `<li><span class="${r.holds ? 'ok' : 'bad'}" aria-label="${r.holds ? 'holds' : 'fails'}">${r.holds ? '✓' : '✗'}</span> ${esc(r.rule)}: <span class="muted">${esc(r.detail)}</span></li>`).join('')}</ul>`).join('')}`;
}

function figuresHtml(s, data) {
  if (!s.metrics) return '<p class="muted">No live figures: the system is not running.</p>';
  const m = s.metrics, r = rates.get(s.id), lat = m.latency_ms;
  const t = s.latency_target;
  const latCard = (f) => `<div class="card"><dt>${f}</dt><dd class="${latencyClass(s, f)}" id="lat-${f}">${lat && lat.samples ? fmtMs(lat[f]) : '—'}
      ${t && targetField(t.percentile) === f ? `<small>target ${esc(fmtTarget(t))}</small>` : ''}</dd></div>`;
  return `<dl class="cards" id="figures">
    <div class="card"><dt>In /s</dt><dd><span id="rate-in">${fmtRate(r ? r.in : null)}</span>${s.rate_target_per_s ? `<small> of ${fmtInt(s.rate_target_per_s)}</small>` : ''}</dd></div>
    <div class="card"><dt>Out /s</dt><dd id="rate-out">${fmtRate(r ? r.out : null)}</dd></div>
    <div class="card"><dt>Messages in (total)</dt><dd id="total-in">${fmtInt(m.messages_in)}</dd></div>
    <div class="card"><dt>Messages out (total)</dt><dd id="total-out">${fmtInt(m.messages_out)}</dd></div>
    <div class="card"><dt>Errors</dt><dd id="errors" class="${m.errors ? 'bad' : ''}">${fmtInt(m.errors)}</dd></div>
    <div class="card"><dt>Gateway connections</dt><dd id="connections">${fmtInt(data.gateway.by_system[s.id] || 0)}</dd></div>
    ${latCard('p50')}${latCard('p95')}${latCard('p99')}
    <div class="card"><dt>max / samples</dt><dd>${lat && lat.samples ? fmtMs(lat.max) : '—'}<small> ${lat ? fmtInt(lat.samples) : 0} samples</small></dd></div>
  </dl>`;
}

function renderSystem(data) {
  const s = data.systems.find((x) => x.id === route.id);
  if (!s) {
    document.title = 'Tributary — unknown system';
    $('view').innerHTML = `<h1>No system “${esc(route.id)}”</h1><p><a href="${esc(withToken('/'))}">All systems</a></p>`;
    return;
  }
  document.title = `Tributary — ${s.title}`;
  const open = new Set([...document.querySelectorAll('details[data-keep][open]')].map((d) => d.dataset.keep));
  $('view').innerHTML = `
    <nav aria-label="Breadcrumb"><a href="${esc(withToken('/'))}">All systems</a> › ${esc(s.title)}</nav>
    <h1>${s.number}. ${esc(s.title)} ${statusBadge(s)}</h1>
    <p class="muted">${esc(s.id)} · ${esc(s.category)}</p>
    <section aria-labelledby="h-topo"><h2 id="h-topo">Topology</h2>
      ${s.implemented ? '' : '<p class="notice" id="reference-notice">Not implemented yet: this is the <strong>seed\'s reference topology</strong>, not a running system.</p>'}
      <div class="graph">${topologySvg(s)}</div>
      ${legendHtml(s.topology)}
      <details data-keep="connections"${open.has('connections') ? ' open' : ''}><summary>Connections as a list</summary>
        <ul>${s.topology.connections.map((c) => `<li>${esc(c.from)} → ${esc(c.to)}</li>`).join('')}</ul></details>
    </section>
    <section aria-labelledby="h-live"><h2 id="h-live">Live figures</h2>${figuresHtml(s, data)}</section>
    <section aria-labelledby="h-status"><h2 id="h-status">Status</h2>
      <div id="status">${s.status == null ? `<p class="muted">${s.implemented ? 'The system reports no status of its own yet.' : 'Not running.'}</p>` : statusHtml(s.status, 'status')}</div></section>
    <div class="grid2">
      <section aria-labelledby="h-checks"><h2 id="h-checks">Checks (design tiers)</h2>${checksDetailHtml(s.checks)}</section>
      <section aria-labelledby="h-targets"><h2 id="h-targets">Targets (from the seed)</h2>
        <table class="status-table" id="targets"><tbody>
          <tr><th scope="row">Latency</th><td>${esc(fmtTarget(s.latency_target))}</td></tr>
          <tr><th scope="row">Request rate</th><td>${s.rate_target_per_s ? fmtInt(s.rate_target_per_s) + ' /s' : '—'}</td></tr>
        </tbody></table></section>
    </div>`;
}

// ---- polling ------------------------------------------------------------------------------

function renderGateway(g) {
  const parts = Object.entries(g.by_system).filter(([, n]) => n > 0).map(([id, n]) => `${id} ${n}`);
  $('gateway').textContent = `Gateway: ${g.connections} of ${g.connections_max} connections` + (parts.length ? ` (${parts.join(', ')})` : '');
}

async function poll() {
  try {
    const response = await fetch(withToken('/v1/dashboard'), { cache: 'no-store' });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { const body = await response.json(); if (body.error) message += ': ' + body.error.message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    const data = await response.json();
    updateRates(data);
    $('loading').hidden = true;
    $('error').hidden = true;
    renderGateway(data.gateway);
    if (route.view === 'system') renderSystem(data); else renderOverview(data);
    $('updated').textContent = 'Updated ' + new Date().toLocaleTimeString();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (error) {
    $('error').textContent = 'Could not read /v1/dashboard: ' + error.message;
    $('error').hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

$('home-link').href = withToken('/');
poll();
