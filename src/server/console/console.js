// arbiter-session operator's console.
//
// Plain ES2020, no framework, no build step. Served under a strict CSP (no inline script or
// style, connect-src 'self'), so: every node is built with createElement/createElementNS and
// textContent (agent-supplied strings are untrusted), widths are set through the CSSOM, and
// all URLs are relative (the console may be mounted under a prefix: page at <base>/ui/, API
// at <base>/v1/).
'use strict';

const TOKEN_KEY = 'arbiter-token';
const API_ROOT = '../v1/';
const SVG_NS = 'http://www.w3.org/2000/svg';
const REFRESH_MS = 3000;
const REASONS = ['budget', 'tool', 'tool_budget', 'rate', 'agent_mismatch', 'closed',
  'expired', 'shared_budget', 'write_through', 'invalid'];

// ---------------------------------------------------------------------------------------
// DOM helpers

/** Builds an HTML element. Strings among children become text nodes (never markup). */
function h(tag, props, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  append(node, children);
  return node;
}

/** Builds an SVG element; attributes only (colours come from CSS classes). */
function s(tag, props, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setProps(node, props);
  append(node, children);
  return node;
}

function setProps(node, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === 'text') node.textContent = String(v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
}

const $ = (sel, root = document) => root.querySelector(sel);
const enc = encodeURIComponent;
const sum = (xs) => xs.reduce((a, b) => a + (b || 0), 0);

// ---------------------------------------------------------------------------------------
// Formatting: numbers with thousands separators; times in local time, UTC ISO as title.

const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const fmt = (n) => (n == null || Number.isNaN(n) ? '—' : numberFormat.format(n));

function localTime(ts, opts) {
  if (ts == null) return '—';
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? String(ts) : d.toLocaleString(undefined, opts || {
    year: 'numeric', month: '2-digit', day: '2-digit',
    hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
  });
}

/** A <time> element: local time shown, the UTC original on hover. */
function timeEl(ts, opts) {
  if (!ts) return h('span', { class: 'muted', text: '—' });
  return h('time', { datetime: ts, title: ts, text: localTime(ts, opts) });
}

const hhmm = (ts) => localTime(ts, { hour: '2-digit', minute: '2-digit', hour12: false });

/** YYYY-MM-DD of a Date, in UTC (report days are UTC days). */
const isoDay = (d) => d.toISOString().slice(0, 10);

function duration(secs) {
  if (secs == null) return '—';
  const s2 = Math.round(secs);
  if (s2 < 120) return `${s2} s`;
  if (s2 < 7200) return `${Math.round(s2 / 60)} min`;
  return `${(s2 / 3600).toFixed(1)} h`;
}

/** Shortens a UUID for dense tables; the full value goes into the title. */
const shortId = (id) => h('span', { class: 'mono', title: id, text: id ? String(id).slice(0, 8) : '—' });

function statusBadge(status) {
  return h('span', { class: `badge ${/^[a-z_]+$/.test(status) ? status : ''}`, text: status });
}

function reasonClass(reason) {
  return REASONS.includes(reason) ? `r-${reason}` : 'r-other';
}

// ---------------------------------------------------------------------------------------
// Bars and charts

/**
 * A horizontal bar of segments against a maximum. Widths go through el.style (CSSOM), which
 * the CSP allows, unlike style attributes in markup.
 */
function bar(segs, max, extraClass) {
  const total = sum(segs.map((x) => x.value));
  const scale = Math.max(max || 0, total, 1);
  const node = h('div', { class: `bar ${extraClass || ''}`.trim() });
  if (max && total > max) node.classList.add('over');
  for (const seg of segs) {
    if (!seg.value) continue;
    const span = h('span', { class: `seg ${seg.cls}`, title: seg.title || null });
    span.style.width = `${(100 * seg.value) / scale}%`;
    node.append(span);
  }
  return node;
}

/** Rounds a chart's top up to 1, 2, 2.5 or 5 times a power of ten. */
function niceCeil(v) {
  if (v <= 1) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return v;
}

/**
 * A vertical stacked column chart as inline SVG.
 * cols: [{label, title, segs: [{cls, value}], limit?}]. The drawing width follows the
 * container's current width, so text is not stretched.
 */
function columnChart(container, cols, { height = 200 } = {}) {
  const W = Math.max(320, Math.floor(container.clientWidth || 900));
  const H = height;
  const pad = { l: 44, r: 8, t: 8, b: 22 };
  const plotW = W - pad.l - pad.r;
  const plotH = H - pad.t - pad.b;
  const top = niceCeil(Math.max(1, ...cols.map((c) => Math.max(sum(c.segs.map((x) => x.value)), c.limit || 0))));
  const y = (v) => pad.t + plotH - (v / top) * plotH;
  const step = plotW / Math.max(1, cols.length);
  const bw = Math.max(1, Math.min(step * 0.8, 60));

  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img' });
  for (const v of [0, top / 2, top]) {
    svg.append(
      s('line', { class: 'grid', x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }),
      s('text', { x: pad.l - 6, y: y(v) + 4, 'text-anchor': 'end', text: fmt(v) }),
    );
  }
  cols.forEach((col, i) => {
    const x = pad.l + i * step + (step - bw) / 2;
    const g = s('g', { class: 'col' }, s('title', { text: col.title || col.label || '' }));
    g.append(s('rect', { class: 'hit', x: pad.l + i * step, y: pad.t, width: step, height: plotH }));
    let base = 0;
    for (const seg of col.segs) {
      if (!seg.value) continue;
      g.append(s('rect', { class: `seg ${seg.cls}`, x, width: bw, y: y(base + seg.value), height: y(base) - y(base + seg.value) }));
      base += seg.value;
    }
    if (col.limit) g.append(s('line', { class: 'limit', x1: x - 2, x2: x + bw + 2, y1: y(col.limit), y2: y(col.limit) }));
    svg.append(g);
    if (col.label) {
      svg.append(s('text', { x: pad.l + i * step + step / 2, y: H - 6, 'text-anchor': 'middle', text: col.label }));
    }
  });
  container.replaceChildren(svg);
}

function legend(items) {
  return h('div', { class: 'legend' },
    items.map((it) => h('span', {}, h('span', { class: `swatch seg ${it.cls}` }), it.name)));
}

/** Label / bar / figure rows, for per-tool and per-reason totals (labels can be long). */
function meters(rows) {
  const max = Math.max(1, ...rows.map((r) => sum(r.segs.map((x) => x.value))));
  return h('div', { class: 'meters' }, rows.map((r) => [
    h('span', { class: 'mono', title: r.label, text: r.label }),
    bar(r.segs, r.max ?? max),
    h('span', { class: 'num', text: r.text }),
  ]));
}

// ---------------------------------------------------------------------------------------
// API access. The token lives in sessionStorage (per tab, gone when the tab closes) and is
// sent as a bearer header; there are no cookies, so no CSRF surface.

class AuthError extends Error {}
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const getToken = () => sessionStorage.getItem(TOKEN_KEY);

/** GETs ../v1/<path>?<params>; empty params are left out. */
async function api(path, params) {
  const url = new URL(API_ROOT + path, location.href);
  for (const [k, v] of Object.entries(params || {})) {
    if (v != null && v !== '') url.searchParams.set(k, v);
  }
  const token = getToken();
  if (!token) throw new AuthError('signed out');
  let res;
  try {
    res = await fetch(url, {
      headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
      cache: 'no-store', credentials: 'omit',
    });
  } catch (e) {
    throw new ApiError(0, 'network', `The service did not answer (${e.message}).`);
  }
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: keep the status text */ }
  const message = (body && body.message) || res.statusText || `HTTP ${res.status}`;
  if (res.status === 401 || res.status === 403) {
    // A token that stopped working (or a gateway token) must not stay around.
    signOut(res.status === 403
      ? `This token may not read the console (${message}).`
      : `The token was not accepted (${message}).`);
    throw new AuthError(message);
  }
  if (!res.ok) throw new ApiError(res.status, body && body.error, message);
  $('#updated').textContent = `updated ${localTime(new Date(), { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false })}`;
  return body;
}

/** Follows next_cursor for up to `pages` pages and concatenates `key`. */
async function fetchAll(path, params, key, pages = 10) {
  const out = [];
  let cursor = null;
  for (let i = 0; i < pages; i++) {
    const page = await api(path, { ...params, cursor });
    out.push(...(page[key] || []));
    cursor = page.next_cursor;
    if (!cursor) return { rows: out, complete: true };
  }
  return { rows: out, complete: false };
}

// ---------------------------------------------------------------------------------------
// Login and routing

function showLogin(message) {
  $('#app').hidden = true;
  $('#login-view').hidden = false;
  $('#login-error').textContent = message || '';
  $('#token').value = '';
  $('#token').focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopTimers();
  generation++;
  $('#view').replaceChildren();
  $('#updated').textContent = '';
  showLogin(message);
}

// Each render bumps `generation`; async work started by an older render checks it before
// touching the DOM, so a slow answer never paints over the page the operator moved to.
let generation = 0;
let timers = [];
function stopTimers() {
  timers.forEach(clearInterval);
  timers = [];
}

/** Splits "#/a/b?x=1" into ["a", "b"] and URLSearchParams. */
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const path = (q < 0 ? raw : raw.slice(0, q)).split('/').filter(Boolean).map(decodeURIComponent);
  return { path, query: new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)) };
}

function route() {
  stopTimers();
  const gen = ++generation;
  if (!getToken()) return showLogin();
  $('#login-view').hidden = true;
  $('#app').hidden = false;

  const { path, query } = parseHash();
  const page = path[0] || 'overview';
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === page);
  const view = $('#view');
  view.replaceChildren();
  const ctx = { view, query, live: () => gen === generation };

  const pages = { overview: overviewPage, sessions: path[1] ? sessionPage : sessionsPage, budgets: budgetsPage, reports: reportsPage };
  const render = pages[page];
  if (!render) {
    view.append(h('div', { class: 'notice', text: 'No such page.' }));
    return undefined;
  }
  document.title = `arbiter-session · ${page}`;
  return render(ctx, path[1]).catch((e) => showError(ctx, e));
}

/** Shows a failed request on the page (auth failures have already sent us to the login). */
function showError(ctx, e, where) {
  if (e instanceof AuthError || !ctx.live()) return;
  const msg = e instanceof ApiError ? e.message : `Unexpected error: ${e.message}`;
  const box = h('div', { class: 'notice', role: 'alert', text: msg });
  (where || ctx.view).prepend(box);
  if (!(e instanceof ApiError)) console.error(e);
}

function card(title, ...children) {
  return h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', { text: title })), children);
}

// ---------------------------------------------------------------------------------------
// Overview: figures, calls per minute, busiest budgets; refreshed every 3 s while shown.

async function overviewPage(ctx) {
  const figure = (id, label) => h('div', { class: 'figure' },
    h('div', { class: 'label', text: label }), h('div', { class: 'value', id, text: '…' }));
  const chartBox = h('div', { class: 'chart-box' });
  const legendBox = h('div');
  const budgetsBox = h('div');
  ctx.view.append(
    h('div', { class: 'figures' },
      figure('overview-live', 'Live sessions'), figure('overview-pending', 'Pending sessions'),
      figure('overview-calls', 'Calls allowed, last hour'), figure('overview-denials', 'Denials, last hour')),
    card('Calls per minute, last hour', chartBox, legendBox),
    card('Busiest budgets', budgetsBox),
  );

  let busy = false;
  const refresh = async () => {
    if (busy) return; // a slow answer must not pile up requests
    busy = true;
    try {
      const o = await api('overview');
      if (!ctx.live()) return;
      ctx.view.querySelectorAll('.notice').forEach((n) => n.remove());
      $('#overview-live').textContent = fmt(o.live_sessions);
      $('#overview-pending').textContent = fmt(o.pending_sessions);
      $('#overview-calls').textContent = fmt(o.calls_last_hour);
      $('#overview-denials').textContent = fmt(o.denials_last_hour);
      $('#overview-denials').parentElement.classList.toggle('bad', o.denials_last_hour > 0);
      drawMinutes(chartBox, legendBox, o.minutes || []);
      drawBusiest(budgetsBox, o.busiest_budgets || []);
    } catch (e) {
      if (!ctx.view.querySelector('.notice')) showError(ctx, e);
    } finally {
      busy = false;
    }
  };
  await refresh();
  if (ctx.live()) timers.push(setInterval(refresh, REFRESH_MS));
}

function drawMinutes(chartBox, legendBox, minutes) {
  // Only reasons that occurred this hour go into the legend, in a fixed order.
  const seen = new Set(minutes.flatMap((m) => Object.keys(m.denied || {}).filter((r) => m.denied[r] > 0)));
  const reasons = [...REASONS.filter((r) => seen.has(r)), ...[...seen].filter((r) => !REASONS.includes(r)).sort()];
  const cols = minutes.map((m, i) => {
    const denied = m.denied || {};
    const lines = [`${hhmm(m.minute)}  allowed ${fmt(m.allowed)}`,
      ...reasons.filter((r) => denied[r]).map((r) => `denied (${r}) ${fmt(denied[r])}`)];
    return {
      label: i % 10 === 0 ? hhmm(m.minute) : '',
      title: lines.join('\n'),
      segs: [{ cls: 'c-allowed', value: m.allowed }, ...reasons.map((r) => ({ cls: reasonClass(r), value: denied[r] || 0 }))],
    };
  });
  columnChart(chartBox, cols, { height: 200 });
  legendBox.replaceChildren(legend([{ cls: 'c-allowed', name: 'allowed' },
    ...reasons.map((r) => ({ cls: reasonClass(r), name: `denied: ${r}` }))]));
}

function drawBusiest(box, budgets) {
  if (!budgets.length) {
    box.replaceChildren(h('div', { class: 'empty', text: 'No budgets.' }));
    return;
  }
  box.replaceChildren(h('div', { class: 'meters' }, budgets.map((b) => [
    h('a', { class: 'mono', href: `#/budgets?id=${enc(b.budget_id)}`, text: b.budget_id }),
    budgetBar(b, false),
    h('span', { class: 'num', text: budgetText(b) }),
  ])));
}

// ---------------------------------------------------------------------------------------
// Budgets

/** Used (solid) and reserved (light) against the limit of the current period. */
function budgetBar(b, tagged) {
  const node = bar([
    { cls: 'used', value: b.used, title: `used ${fmt(b.used)}` },
    { cls: 'reserved', value: b.reserved, title: `reserved ${fmt(b.reserved)}` },
  ], b.limit);
  if (tagged) {
    // Hooks for tests/console/browser.py.
    node.classList.add('budget-bar');
    node.dataset.budgetId = b.budget_id;
    node.dataset.used = String(b.used);
  }
  node.title = `used ${fmt(b.used)}, reserved ${fmt(b.reserved)}, limit ${fmt(b.limit)} ${b.unit}`;
  return node;
}

function budgetText(b) {
  let t = `${fmt(b.used)} / ${fmt(b.limit)} ${b.unit}`;
  if (b.reserved) t += ` (+${fmt(b.reserved)} reserved)`;
  if (b.overrun) t += `, overrun ${fmt(b.overrun)}`;
  return t;
}

function periodText(b) {
  if (b.period === 'none') return 'no period';
  return `${b.period} ${localTime(b.period_start, { month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', hour12: false })}` +
    (b.period_end ? ` → ${localTime(b.period_end, { month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', hour12: false })}` : '') +
    ` (${b.time_zone})`;
}

/** Orders budgets depth-first by parent_id; a budget whose parent is absent is a root. */
function budgetTree(budgets) {
  const byId = new Map(budgets.map((b) => [b.budget_id, b]));
  const children = new Map();
  for (const b of budgets) {
    const p = b.parent_id && byId.has(b.parent_id) ? b.parent_id : null;
    if (!children.has(p)) children.set(p, []);
    children.get(p).push(b);
  }
  const out = [];
  const walk = (parent, depth, seen) => {
    for (const b of (children.get(parent) || []).sort((x, y) => x.budget_id.localeCompare(y.budget_id))) {
      if (seen.has(b.budget_id)) continue; // a cycle must not hang the page
      seen.add(b.budget_id);
      out.push({ b, depth });
      walk(b.budget_id, depth + 1, seen);
    }
  };
  walk(null, 0, new Set());
  return out;
}

async function budgetsPage(ctx) {
  const { budgets } = await api('budgets');
  if (!ctx.live()) return;
  const history = h('div');
  const rows = [];
  const select = (b, row) => {
    rows.forEach((r) => r.classList.remove('selected'));
    row.classList.add('selected');
    const q = new URLSearchParams({ id: b.budget_id });
    window.history.replaceState(null, '', `#/budgets?${q}`); // no hashchange, no re-render
    budgetHistory(ctx, history, b);
  };
  const tree = h('div', { class: 'budget-tree' },
    h('div', { class: 'row head' }, h('span', { text: 'Budget' }), h('span', { text: 'Current period' }),
      h('span', { class: 'num', text: 'Used / limit' }), h('span', { text: 'Period' })));
  for (const { b, depth } of budgetTree(budgets)) {
    const name = h('span', { class: 'budget-name', title: b.budget_id, text: b.budget_id });
    name.style.paddingLeft = `${depth * 18}px`;
    const row = h('div', { class: 'row', tabindex: 0, dataset: { budgetId: b.budget_id } },
      name, budgetBar(b, true), h('span', { class: 'num', text: budgetText(b) }),
      h('span', { class: 'muted', text: periodText(b) }));
    row.addEventListener('click', () => select(b, row));
    row.addEventListener('keydown', (e) => { if (e.key === 'Enter') select(b, row); });
    rows.push(row);
    tree.append(row);
  }
  ctx.view.append(
    card('Budgets', budgets.length ? tree : h('div', { class: 'empty', text: 'No budgets.' }),
      legend([{ cls: 'used', name: 'used' }, { cls: 'reserved', name: 'reserved' }])),
    history,
  );
  const wanted = ctx.query.get('id');
  const row = rows.find((r) => r.dataset.budgetId === wanted);
  if (row) row.click();
}

/** Past periods of one budget, from the budgets report (filtered here by budget_id). */
async function budgetHistory(ctx, box, b) {
  const token = Symbol('history');
  box.token = token;
  const chartBox = h('div');
  box.replaceChildren(card(`Periods of ${b.budget_id}`, chartBox));
  chartBox.append(h('div', { class: 'empty', text: 'Loading…' }));
  try {
    const since = new Date(Date.now() - 400 * 86400e3);
    const { rows, complete } = await fetchAll('reports/budgets',
      { since: isoDay(since), until: isoDay(new Date()), limit: 1000 }, 'rows', 10);
    if (!ctx.live() || box.token !== token) return;
    const mine = rows.filter((r) => r.budget_id === b.budget_id)
      .sort((x, y) => String(x.period_start).localeCompare(String(y.period_start)));
    if (!mine.length) {
      chartBox.replaceChildren(h('div', { class: 'empty', text: 'No periods recorded yet.' }));
      return;
    }
    const every = Math.ceil(mine.length / 12);
    const day = (ts) => localTime(ts, { year: 'numeric', month: '2-digit', day: '2-digit' });
    chartBox.replaceChildren();
    columnChart(chartBox, mine.map((r, i) => ({
      label: i % every === 0 ? day(r.period_start) : '',
      title: `${day(r.period_start)}: used ${fmt(r.used)}, reserved ${fmt(r.reserved)}, ` +
        `allocated ${fmt(r.allocated)}, overrun ${fmt(r.overrun)} of ${fmt(r.unit_limit)} ${r.unit}`,
      segs: [{ cls: 'used', value: r.used }, { cls: 'reserved', value: r.reserved }],
      limit: r.unit_limit,
    })), { height: 180 });
    chartBox.append(legend([{ cls: 'used', name: 'used' }, { cls: 'reserved', name: 'reserved' }]),
      h('div', { class: 'muted', text: `Black tick: the period's limit.${complete ? '' : ' Only the first 10 pages of the report are shown.'}` }));
  } catch (e) {
    showError(ctx, e, chartBox);
  }
}

// ---------------------------------------------------------------------------------------
// Sessions list. Filters live in the hash (#/sessions?status=active...), so Back and
// bookmarks keep them.

async function sessionsPage(ctx) {
  const q = ctx.query;
  const field = (label, input) => h('label', {}, label, input);
  const agent = h('input', { name: 'agent_id', placeholder: 'agent uuid', size: 36, value: q.get('agent_id') || '' });
  const status = h('select', { name: 'status' }, ['', 'active', 'closed', 'expired'].map((v) =>
    h('option', { value: v, text: v || 'any', selected: q.get('status') === v || null })));
  const budget = h('input', { name: 'budget_id', placeholder: 'budget id', value: q.get('budget_id') || '' });
  // datetime-local is in local time; the API wants RFC 3339, converted on submit.
  const since = h('input', { name: 'created_since', type: 'datetime-local' });
  if (q.get('created_since')) {
    const d = new Date(q.get('created_since'));
    if (!Number.isNaN(d.getTime())) since.value = new Date(d.getTime() - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 16);
  }
  const form = h('form', { class: 'filters', id: 'session-filters' },
    field('Agent', agent), field('Status', status), field('Budget', budget), field('Created since', since),
    h('button', { type: 'submit', text: 'Filter' }),
    h('button', { type: 'button', class: 'secondary', text: 'Clear', onclick: () => { location.hash = '#/sessions'; } }));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    if (agent.value.trim()) p.set('agent_id', agent.value.trim());
    if (status.value) p.set('status', status.value);
    if (budget.value.trim()) p.set('budget_id', budget.value.trim());
    if (since.value) p.set('created_since', new Date(since.value).toISOString());
    const next = `#/sessions${p.toString() ? `?${p}` : ''}`;
    if (location.hash === next) route(); else location.hash = next;
  });

  const tbody = h('tbody');
  const more = h('div', { class: 'more' });
  ctx.view.append(card('Sessions', form), h('section', { class: 'card' },
    h('div', { class: 'table-wrap' }, h('table', { id: 'sessions-table' },
      h('thead', {}, h('tr', {}, ['Session', 'Agent', 'Status', 'Calls', 'Created', 'Expires', 'Budget'].map((t) => h('th', { text: t })))),
      tbody)), more));

  const params = { limit: 50 };
  for (const k of ['agent_id', 'status', 'budget_id', 'created_since']) if (q.get(k)) params[k] = q.get(k);
  const load = async (cursor) => {
    const page = await api('sessions', { ...params, cursor });
    if (!ctx.live()) return;
    for (const x of page.sessions) tbody.append(sessionRow(x));
    if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { colspan: 7, class: 'empty', text: 'No sessions match.' })));
    more.replaceChildren(page.next_cursor
      ? h('button', { type: 'button', class: 'secondary', text: 'Next page', onclick: (e) => { e.target.disabled = true; load(page.next_cursor).catch((err) => showError(ctx, err, more)); } })
      : h('span', { class: 'muted', text: `${fmt(tbody.querySelectorAll('.session-row').length)} sessions` }));
  };
  await load(null);
}

function callsCell(made, budget) {
  return h('td', {}, bar([{ cls: made >= budget ? 'full' : 'used', value: made }], budget, 'small'),
    h('span', { class: 'num', text: `${fmt(made)} / ${fmt(budget)}` }));
}

function sessionRow(x) {
  const href = `#/sessions/${enc(x.session_id)}`;
  const tr = h('tr', { class: 'session-row', dataset: { sessionId: x.session_id } },
    h('td', {}, h('a', { href, class: 'mono', title: x.session_id, text: x.session_id.slice(0, 8) })),
    h('td', {}, shortId(x.agent_id)),
    h('td', {}, statusBadge(x.status)),
    callsCell(x.calls_made, x.call_budget),
    h('td', {}, timeEl(x.created_at)),
    h('td', {}, timeEl(x.expires_at)),
    h('td', {}, x.budget_id ? h('a', { class: 'mono', href: `#/budgets?id=${enc(x.budget_id)}`, text: x.budget_id }) : '—'));
  // The whole row opens the session, except clicks on its own links.
  tr.addEventListener('click', (e) => { if (!e.target.closest('a')) location.hash = href; });
  return tr;
}

// ---------------------------------------------------------------------------------------
// One session: terms, meters, audit chain verdict, timeline.

async function sessionPage(ctx, id) {
  const [x, first] = await Promise.all([api(`sessions/${enc(id)}`), api(`sessions/${enc(id)}/events`, { limit: 200 })]);
  if (!ctx.live()) return;

  const tools = h('span', {}, (x.authorized_tools || []).map((t) => h('span', { class: 'tag mono', text: x.tool_costs && x.tool_costs[t] != null ? `${t} ×${fmt(x.tool_costs[t])}` : t })));
  const rate = x.rate_limit_per_minute == null ? 'none'
    : `${fmt(x.rate_limit_per_minute)} per ${fmt(x.rate_limit_window_secs)} s (${fmt(x.rate_window_calls)} in the current window)`;
  const terms = h('dl', { class: 'terms' }, [
    ['Session', h('span', { class: 'mono', text: x.session_id })],
    ['Agent', h('span', { class: 'mono', text: x.agent_id })],
    // The stored status stays active past the time limit until the session is next used;
    // the sessions list and the reports call it expired, and so does this page.
    ['Status', statusBadge(x.status === 'active' && Date.parse(x.expires_at) <= Date.now() ? 'expired' : x.status)],
    ['Tools', tools],
    ['Intent', x.declared_intent || '—'],
    ['Sensitivity ceiling', x.data_sensitivity_ceiling || '—'],
    ['Rate limit', rate],
    ['Created', timeEl(x.created_at)],
    ['Expires', timeEl(x.expires_at)],
    ['Budget', x.budget_id ? h('a', { class: 'mono', href: `#/budgets?id=${enc(x.budget_id)}`, text: x.budget_id }) : 'none'],
  ].map(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)]));

  const meterRows = [{ label: 'calls', segs: [{ cls: x.calls_made >= x.call_budget ? 'full' : 'used', value: x.calls_made }], max: x.call_budget, text: `${fmt(x.calls_made)} / ${fmt(x.call_budget)} (${fmt(x.calls_remaining)} left)` }];
  for (const [tool, t] of Object.entries(x.tool_limits || {}).sort()) {
    meterRows.push({ label: tool, segs: [{ cls: t.calls >= t.limit ? 'full' : 'used', value: t.calls }], max: t.limit, text: `${fmt(t.calls)} / ${fmt(t.limit)}` });
  }

  const verdict = h('div', { id: 'chain-verdict' });
  const tbody = h('tbody');
  const more = h('div', { class: 'more' });
  ctx.view.append(
    h('div', { class: 'grid2' }, card('Terms', terms), card('Usage', meters(meterRows), h('div', { class: 'more' }, verdict))),
    h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', { text: 'Timeline' })),
      h('div', { class: 'table-wrap' }, h('table', { id: 'events-table' },
        h('thead', {}, h('tr', {}, ['Time', 'Kind', 'Tools', 'Reason', 'Calls made', 'Status', 'Version', 'Hash'].map((t) => h('th', { text: t })))),
        tbody)), more));

  // The verdict covers every page loaded so far: one broken page makes it broken.
  let broken = null;
  const show = (page) => {
    if (!page.chain_intact && broken == null) broken = page.broken_link || 'an unknown link';
    verdict.className = broken == null ? 'ok' : 'broken';
    verdict.textContent = broken == null ? '✓ Audit hash chain verified' : `✗ Audit hash chain BROKEN at ${broken}`;
    for (const ev of page.events) tbody.append(eventRow(ev, x.agent_id));
    if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { colspan: 8, class: 'empty', text: 'No events.' })));
    more.replaceChildren(page.next_cursor ? h('button', {
      type: 'button', class: 'secondary', text: 'Load more',
      onclick: async (e) => {
        e.target.disabled = true;
        try {
          const next = await api(`sessions/${enc(id)}/events`, { limit: 200, cursor: page.next_cursor });
          if (ctx.live()) show(next);
        } catch (err) { showError(ctx, err, more); }
      },
    }) : h('span', { class: 'muted', text: `${fmt(tbody.querySelectorAll('.event-row').length)} events` }));
  };
  show(first);
}

function eventRow(ev, agentId) {
  const denied = ev.kind === 'denied';
  const reason = h('td', { class: 'wrap' }, ev.reason || '');
  if (ev.presented_agent_id && ev.presented_agent_id !== agentId) {
    reason.append(' ', h('span', { class: 'muted', text: 'presented ' }), shortId(ev.presented_agent_id));
  }
  return h('tr', { class: `event-row${denied ? ' denied' : ''}`, dataset: { kind: ev.kind } },
    h('td', {}, timeEl(ev.occurred_at)),
    h('td', { class: 'kind', text: ev.kind }),
    h('td', {}, (ev.tools || []).map((t) => h('span', { class: 'tag mono', text: t }))),
    reason,
    h('td', { class: 'num', text: fmt(ev.calls_made) }),
    h('td', { text: ev.status || '' }),
    h('td', { class: 'num', text: ev.session_version == null ? '' : fmt(ev.session_version) }),
    h('td', { class: 'mono', title: ev.hash || '', text: ev.hash ? ev.hash.slice(0, 12) : '—' }));
}

// ---------------------------------------------------------------------------------------
// Reports: date range + report kind in the hash; chart over the loaded rows; paged table.

const sessionLink = (id) => h('a', { class: 'mono', href: `#/sessions/${enc(id)}`, title: id, text: String(id).slice(0, 8) });
const col = (key, label, cell) => ({ key, label, plain: !cell, cell: cell || ((r) => (typeof r[key] === 'number' ? fmt(r[key]) : r[key] ?? '—')) });
const isNumCol = (c, r) => c.plain && typeof r[c.key] === 'number';

const REPORTS = {
  agents: {
    title: 'Agents by day',
    cols: [col('day', 'Day'), col('agent_id', 'Agent', (r) => shortId(r.agent_id)), col('sessions_opened', 'Sessions'),
      col('calls_allowed', 'Allowed'), col('calls_denied', 'Denied'),
      ...['budget', 'tool', 'tool_budget', 'rate', 'agent_mismatch', 'closed', 'expired', 'write_through', 'invalid']
        .map((r) => col(`denied_${r}`, `↳ ${r}`))],
    chart(box, rows) {
      // Allowed vs denied per day, all agents together.
      const days = new Map();
      for (const r of rows) {
        const d = days.get(r.day) || { allowed: 0, denied: 0 };
        d.allowed += r.calls_allowed;
        d.denied += r.calls_denied;
        days.set(r.day, d);
      }
      const sorted = [...days].sort(([a], [b]) => a.localeCompare(b));
      const every = Math.ceil(sorted.length / 15);
      columnChart(box, sorted.map(([day, d], i) => ({
        label: i % every === 0 ? day : '', title: `${day}: allowed ${fmt(d.allowed)}, denied ${fmt(d.denied)}`,
        segs: [{ cls: 'c-allowed', value: d.allowed }, { cls: 'c-denied', value: d.denied }],
      })));
      box.append(legend([{ cls: 'c-allowed', name: 'allowed' }, { cls: 'c-denied', name: 'denied' }]));
    },
  },
  tools: {
    title: 'Tools by day',
    cols: [col('day', 'Day'), col('tool', 'Tool', (r) => h('span', { class: 'mono', text: r.tool })),
      col('calls_allowed', 'Allowed'), col('calls_denied', 'Denied'), col('agents', 'Agents'), col('sessions', 'Sessions')],
    chart(box, rows) {
      const tools = new Map();
      for (const r of rows) {
        const t = tools.get(r.tool) || { allowed: 0, denied: 0 };
        t.allowed += r.calls_allowed;
        t.denied += r.calls_denied;
        tools.set(r.tool, t);
      }
      const sorted = [...tools].sort(([, a], [, b]) => b.allowed + b.denied - a.allowed - a.denied).slice(0, 25);
      box.replaceChildren(meters(sorted.map(([tool, t]) => ({
        label: tool, text: `${fmt(t.allowed)} allowed, ${fmt(t.denied)} denied`,
        segs: [{ cls: 'c-allowed', value: t.allowed }, { cls: 'c-denied', value: t.denied }],
      }))), legend([{ cls: 'c-allowed', name: 'allowed' }, { cls: 'c-denied', name: 'denied' }]));
    },
  },
  denials: {
    title: 'Denials by day and reason',
    cols: [col('day', 'Day'), col('reason', 'Reason'), col('denials', 'Denials'), col('agents', 'Agents'), col('sessions', 'Sessions')],
    chart(box, rows) {
      const reasons = new Map();
      for (const r of rows) reasons.set(r.reason, (reasons.get(r.reason) || 0) + r.denials);
      const sorted = [...reasons].sort(([, a], [, b]) => b - a);
      box.replaceChildren(meters(sorted.map(([reason, n]) => ({
        label: reason, text: fmt(n), segs: [{ cls: reasonClass(reason), value: n }],
      }))));
    },
  },
  utilization: {
    title: 'Session utilization',
    cols: [col('session_id', 'Session', (r) => sessionLink(r.session_id)), col('agent_id', 'Agent', (r) => shortId(r.agent_id)),
      col('status', 'Status', (r) => statusBadge(r.status)),
      col('calls_made', 'Calls', (r) => [bar([{ cls: r.budget_exhausted ? 'full' : 'used', value: r.calls_made }], r.call_budget, 'small'), `${fmt(r.calls_made)} / ${fmt(r.call_budget)}`]),
      col('budget_used_pct', 'Used %', (r) => `${fmt(r.budget_used_pct)} %`),
      col('created_at', 'Created', (r) => timeEl(r.created_at)), col('ended_at', 'Ended', (r) => timeEl(r.ended_at)),
      col('duration_secs', 'Duration', (r) => duration(r.duration_secs)), col('denials', 'Denials'),
      col('tool_use', 'Tool limits', (r) => Object.entries(r.tool_use || {}).map(([t, u]) => h('span', { class: 'tag mono', text: `${t} ${fmt(u.calls)}/${fmt(u.limit)}` })))],
    chart: null,
  },
};

async function reportsPage(ctx) {
  const q = ctx.query;
  const today = new Date();
  const kind = REPORTS[q.get('report')] ? q.get('report') : 'tools';
  const sinceV = q.get('since') || isoDay(new Date(today.getTime() - 6 * 86400e3));
  const untilV = q.get('until') || isoDay(today);
  const since = h('input', { type: 'date', name: 'since', value: sinceV, required: true });
  const until = h('input', { type: 'date', name: 'until', value: untilV, required: true });
  const agent = h('input', { name: 'agent_id', placeholder: 'any agent', size: 36, value: q.get('agent_id') || '' });
  const report = h('select', { name: 'report' }, Object.keys(REPORTS).map((k) => h('option', { value: k, text: k, selected: k === kind || null })));
  const form = h('form', { class: 'filters', id: 'report-form' },
    h('label', {}, 'Report', report), h('label', {}, 'Since (UTC)', since), h('label', {}, 'Until (UTC)', until),
    h('label', {}, 'Agent', agent), h('button', { type: 'submit', text: 'Show' }));
  const go = (e) => {
    if (e) e.preventDefault();
    const p = new URLSearchParams({ report: report.value, since: since.value, until: until.value });
    if (agent.value.trim()) p.set('agent_id', agent.value.trim());
    const next = `#/reports?${p}`;
    if (location.hash === next) route(); else location.hash = next;
  };
  form.addEventListener('submit', go);
  report.addEventListener('change', () => go());

  const spec = REPORTS[kind];
  const chartBox = h('div');
  const chartNote = h('div', { class: 'muted' });
  const tbody = h('tbody');
  const more = h('div', { class: 'more' });
  ctx.view.append(card('Reports', form));
  if (spec.chart) ctx.view.append(card(spec.title, chartBox, chartNote));
  ctx.view.append(h('section', { class: 'card' },
    h('div', { class: 'card-head' }, h('h2', { text: spec.chart ? 'Rows' : spec.title })),
    h('div', { class: 'table-wrap' }, h('table', { id: 'report-table' },
      h('thead', {}, h('tr', {}, spec.cols.map((c) => h('th', { text: c.label })))), tbody)), more));
  const heads = ctx.view.querySelectorAll('#report-table th');

  // The chart sums the rows loaded so far; "Load more" pages the table and redraws it.
  const rows = [];
  const params = { since: sinceV, until: untilV, limit: 500, agent_id: q.get('agent_id') || null };
  const load = async (cursor) => {
    const page = await api(`reports/${kind}`, { ...params, cursor });
    if (!ctx.live()) return;
    rows.push(...page.rows);
    // Numeric columns are right-aligned, headers included (known once a row is in).
    if (page.rows.length) spec.cols.forEach((c, i) => heads[i].classList.toggle('num', isNumCol(c, page.rows[0])));
    for (const r of page.rows) {
      tbody.append(h('tr', { class: 'report-row' }, spec.cols.map((c) => h('td', { class: isNumCol(c, r) ? 'num' : null }, c.cell(r)))));
    }
    if (!rows.length) tbody.replaceChildren(h('tr', {}, h('td', { colspan: spec.cols.length, class: 'empty', text: 'No rows in this range.' })));
    if (spec.chart) {
      if (rows.length) { chartBox.replaceChildren(); spec.chart(chartBox, rows); } else chartBox.replaceChildren(h('div', { class: 'empty', text: 'Nothing to chart.' }));
      chartNote.textContent = page.next_cursor ? `Covers the ${fmt(rows.length)} rows loaded so far.` : '';
    }
    more.replaceChildren(page.next_cursor
      ? h('button', { type: 'button', class: 'secondary', text: 'Next page', onclick: (e) => { e.target.disabled = true; load(page.next_cursor).catch((err) => showError(ctx, err, more)); } })
      : h('span', { class: 'muted', text: `${fmt(rows.length)} rows` }));
  };
  await load(null);
}

// ---------------------------------------------------------------------------------------
// Start

document.addEventListener('DOMContentLoaded', () => {
  $('#login').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('#token').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $('#token').value = '';
    $('#login-error').textContent = '';
    route();
  });
  $('#sign-out').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', route);
  route();
});
