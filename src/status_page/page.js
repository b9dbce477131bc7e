// The admin status page: reads /status every two seconds and draws it; dead letters can be
// sent again or discarded. The admin token, when the proxy needs one, is kept for this tab only
// (sessionStorage) and sent as `Authorization: Bearer`. Everything is drawn with textContent:
// nothing the CRM or a client wrote is ever parsed as HTML.
'use strict';

const REFRESH_MS = 2000;
const TOKEN_KEY = 'crm-quota-proxy-admin-token';
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || '';
let timer = null;

function authHeaders() {
  return token ? { Authorization: 'Bearer ' + token } : {};
}

// el('td', {class: 'num', k: 'quota.x.used'}, 'text', node, ...)
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name === 'k') node.dataset.k = value;
    else if (name === 'onclick') node.addEventListener('click', value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function age(seconds) {
  if (seconds === undefined || seconds === null) return '';
  const s = Math.round(seconds);
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
  if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
  return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
}

function clock(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString();
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}

function problem(text) {
  $('problem').textContent = text;
  $('problem').hidden = !text;
}

function badge(text, kind) {
  return el('span', { class: 'badge' + (kind ? ' ' + kind : '') }, text);
}

function bar(used, limit) {
  const share = limit > 0 ? Math.min(1, used / limit) : 0;
  const kind = share >= 1 ? ' full' : share >= 0.8 ? ' warn' : '';
  const fill = el('span');
  fill.style.width = (share * 100).toFixed(1) + '%';
  return el('div', { class: 'bar' + kind, title: Math.round(share * 100) + '% of ' + limit }, fill);
}

function fill(id, rows, empty) {
  const body = $(id);
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const cols = body.closest('table').querySelectorAll('thead th').length;
    body.append(el('tr', {}, el('td', { colspan: cols, class: 'muted' }, empty)));
  }
}

function render(s) {
  $('main').hidden = false;
  const badges = [
    s.ready ? badge('ready') : badge('not ready', 'warn'),
    s.enforce ? null : badge('shadow mode: nothing enforced', 'warn'),
    s.breaker.open ? badge('CRM failing: the drain only probes', 'bad') : null,
    s.ledger.shared ? null : badge('shared ledger unreachable: on its own share', 'bad'),
    s.upstream.consecutive_errors > 0 ? badge(s.upstream.consecutive_errors + ' CRM errors in a row', 'warn') : null,
  ];
  $('badges').replaceChildren(...badges.filter(Boolean));
  $('updated').textContent = 'updated ' + clock(s.now);

  fill('quotas', s.quotas.map((q) => {
    const k = 'quota.' + q.name + '.';
    const classes = Object.fromEntries(q.classes.map((c) => [c.class, c.used]));
    return el('tr', {},
      el('td', {}, q.name, q.enforce ? null : el('span', { class: 'muted' }, ' (shadow)')),
      el('td', {}, q.window + ' ' + q.kind),
      el('td', {}, bar(q.used, q.limit)),
      el('td', { class: 'num' }, el('span', { k: k + 'used' }, q.used), ' / ', el('span', { k: k + 'limit' }, q.limit)),
      el('td', { class: 'num', k: k + 'remaining' }, q.remaining),
      el('td', { class: 'num', k: k + 'crm_remaining' },
        q.crm_remaining === null ? '–' : q.crm_remaining + (q.crm_limit === null ? '' : ' / ' + q.crm_limit)),
      el('td', { class: 'num' }, [classes.read, classes.live, classes.drain].map((n) => n ?? 0).join(' · ')),
      el('td', {}, clock(q.next_reset_at)),
      el('td', {}, q.frozen_until ? clock(q.frozen_until) : ''));
  }), 'no quotas');

  fill('forecasts', s.forecasts.map((f) => {
    const k = 'forecast.' + f.quota + '.';
    const early = f.exhaustion_eta_seconds !== null && f.exhaustion_eta_seconds < f.business_left_seconds;
    const runsOut = f.exhaustion_eta_seconds === null
      ? 'lasts until the reset (' + clock(f.reset_at) + ')'
      : 'in ' + age(f.exhaustion_eta_seconds);
    return el('tr', {},
      el('td', {}, f.quota),
      el('td', { class: 'num' }, el('span', { k: k + 'used' }, f.used), ' / ', f.limit),
      el('td', { class: 'num', k: k + 'released' }, f.released === null ? 'no schedule' : f.released),
      el('td', { class: 'num' }, f.live_per_minute.toFixed(1) + ' /min'),
      el('td', { k: k + 'runs_out' }, early ? badge(runsOut + ', before business hours end', 'bad') : runsOut),
      el('td', {}, f.business_left_seconds > 0 ? age(f.business_left_seconds) : 'over'),
      el('td', { class: 'num', k: k + 'backlog' }, f.backlog_calls),
      el('td', { class: 'num', k: k + 'deliverable' }, f.backlog_deliverable));
  }), 'no daily quota');
  $('days').hidden = s.forecasts.length === 0;

  fill('clients', s.clients.map((c) => {
    const k = 'client.' + c.name + '.';
    const shares = c.quotas.map((q) => q.quota + ' ' + Math.round(q.share * 100) + '%').join(', ');
    return el('tr', {},
      el('td', {}, c.name),
      el('td', { class: 'num' }, c.weight),
      el('td', {}, shares),
      el('td', { class: 'num', k: k + 'parked' }, c.parked),
      el('td', { class: 'num' }, c.parked > 0 ? age(c.oldest_parked_age_seconds) : ''));
  }), 'no clients');

  const q = s.queue;
  const eta = q.queued > 0 ? 'empties in about ' + age(q.drain_eta_seconds) + ' at the quotas\' pace' : 'empty';
  $('queue-summary').replaceChildren(
    el('span', { k: 'queue.queued' }, q.queued), ' waiting, ',
    el('span', { k: 'queue.dispatching' }, q.dispatching), ' being sent, ',
    el('span', { k: 'queue.failed' }, q.failed), ' failed, ',
    el('span', { k: 'queue.expired' }, q.expired), ' expired; ',
    bytes(q.bytes) + ' held; ',
    el('span', { k: 'queue.drain' }, eta), '.');
  fill('lanes', q.lanes.filter((l) => l.depth > 0).map((l) => el('tr', {},
    el('td', {}, l.name),
    el('td', {}, l.client),
    el('td', { class: 'num', k: 'lane.' + l.client + '.' + l.name + '.depth' }, l.depth),
    el('td', { class: 'num' }, age(l.oldest_age_seconds)))), 'nothing waiting');

  fill('dead', q.dead_letters.map((d) => el('tr', { k: 'dead.' + d.id },
    el('td', { title: d.id }, el('code', {}, d.id.slice(0, 8))),
    el('td', {}, d.route),
    el('td', {}, d.client),
    el('td', { k: 'dead.' + d.id + '.status' }, d.status),
    el('td', {}, d.reason || ''),
    el('td', { class: 'error' }, d.error || ''),
    el('td', { class: 'num' }, d.attempts),
    el('td', {}, clock(d.created_at)),
    el('td', {},
      el('button', { type: 'button', 'data-action': 'retry', 'data-id': d.id, onclick: () => retry(d) }, 'Retry'), ' ',
      el('button', { type: 'button', class: 'danger', 'data-action': 'discard', 'data-id': d.id, onclick: () => discard(d) }, 'Discard')))),
  'none');

  const config = s.config.sha256 ? 'config ' + s.config.sha256.slice(0, 12) + ' ' : 'config ';
  $('footer').textContent = 'version ' + s.version + ' · ' + config +
    'loaded ' + clock(s.config.loaded_at) + ' · ledger ' + s.ledger.store +
    (s.ledger.replica_id ? ' (' + s.ledger.replica_id + ')' : '');
}

async function refresh() {
  clearTimeout(timer);
  try {
    const resp = await fetch('/status', { headers: authHeaders(), cache: 'no-store' });
    if (resp.status === 401) {
      askForToken(token ? 'the proxy refused this token' : 'this proxy needs its admin token');
      return;
    }
    if (!resp.ok) throw new Error('/status answered ' + resp.status);
    render(await resp.json());
    $('token-form').hidden = true;
    problem('');
  } catch (e) {
    problem('Cannot read the proxy\'s status: ' + e.message + ' (trying again)');
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function askForToken(why) {
  $('token-why').textContent = why;
  $('token-form').hidden = false;
  $('token').focus();
}

async function act(method, path, what) {
  try {
    const resp = await fetch(path, { method, headers: authHeaders() });
    if (resp.status === 401) {
      askForToken('the proxy needs its admin token to ' + what);
    } else if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      problem('Could not ' + what + ': ' + resp.status + ' ' + (body.description || body.error || ''));
      return;
    }
  } catch (e) {
    problem('Could not ' + what + ': ' + e.message);
    return;
  }
  problem('');
  refresh();
}

function retry(d) {
  let path = '/requests/' + encodeURIComponent(d.id) + '/retry';
  if (d.reason === 'ambiguous') {
    const sure = window.confirm('The CRM may already have applied this write (its answer was lost). ' +
      'Sending it again may apply it twice. Send it again?');
    if (!sure) return;
    path += '?confirm_ambiguous=true';
  }
  act('POST', path, 'retry ' + d.id);
}

function discard(d) {
  if (!window.confirm('Give up write ' + d.id + ' for good? It will never reach the CRM.')) return;
  act('DELETE', '/requests/' + encodeURIComponent(d.id), 'discard ' + d.id);
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  token = $('token').value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token').value = '';
  refresh();
});

// The proxy says whether it needs a token: without one, the page asks before reading.
const tokenRequired = document.querySelector('meta[name="admin-token"]').content === 'required';
if (tokenRequired && !token) {
  askForToken('this proxy needs its admin token (listen.admin_token_file or CRM_PROXY_ADMIN_TOKEN)');
} else {
  refresh();
}
