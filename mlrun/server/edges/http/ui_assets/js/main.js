// Entry point: sign-in, the hash router (#/runs?..., #/run/<id>?..., #/compare?...), the
// "slow answer" spinner and the backend banner. Every view's state lives in the hash, so a
// reload or a shared link restores it.
import { api, on, ready, session, setKey, uiConfig } from './api.js';
import { clear, h } from './dom.js';
import { renderRuns } from './runs.js';
import { renderRun } from './run.js';
import { renderCompare } from './compare.js';

const main = document.getElementById('main');
const banner = document.getElementById('banner');
const busy = document.getElementById('busy');
const signout = document.getElementById('signout');
const nav = document.getElementById('nav');
let current = null; // the active view's cleanup
let busyTimer = null;
let readyTimer = null;

export const debug = { timings: {} };
window.mlrunDebug = debug; // read by the browser tests; holds no key

export function mark(name) {
  if (!(name in debug.timings)) {
    performance.mark(name);
    debug.timings[name] = performance.now();
  }
}

export function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/runs';
  const [path, search = ''] = raw.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent),
           params: new URLSearchParams(search) };
}

export function navigate(path, params, { replace = false } = {}) {
  const search = params ? params.toString() : '';
  const hash = `#${path}${search ? `?${search}` : ''}`;
  if (hash === location.hash) return;
  if (replace) history.replaceState(null, '', hash);
  else history.pushState(null, '', hash);
}

on('busy', (active) => {
  // A spinner only for answers slower than 250 ms, so fast pages do not flicker.
  clearTimeout(busyTimer);
  if (active) busyTimer = setTimeout(() => { busy.hidden = false; }, 250);
  else busy.hidden = true;
});

on('unauthorized', () => {
  if (!session.key) return;
  setKey(null);
  showSignIn('Your API key is no longer valid (revoked or expired). Sign in again.');
});

on('unavailable', () => checkReady());

async function checkReady() {
  clearTimeout(readyTimer);
  try {
    const { ok, body } = await ready();
    if (ok) {
      banner.hidden = true;
      readyTimer = setTimeout(checkReady, 15000);
      return;
    }
    const failing = Object.entries(body.backends || {}).filter(([, s]) => !s.ok).map(([n]) => n);
    banner.textContent = `The server cannot reach: ${failing.join(', ') || 'a backend'}. ` +
      'Data shown may be stale; retrying…';
  } catch {
    banner.textContent = 'The server does not answer. Retrying…';
  }
  banner.hidden = false;
  readyTimer = setTimeout(checkReady, 3000);
}

function stopView() {
  if (current) { current(); current = null; }
}

function showSignIn(message) {
  stopView();
  signout.hidden = true;
  clear(nav);
  clear(main);
  const input = h('input', { type: 'password', id: 'apikey', name: 'apikey',
    autocomplete: 'off', placeholder: 'mlrun_…', 'aria-label': 'API key', required: true });
  const error = h('p', { class: 'error', id: 'signin-error', 'aria-live': 'polite' });
  if (message) error.textContent = message;
  const form = h('form', { class: 'card signin', id: 'signin' },
    h('h1', { text: 'Sign in to MLRun' }),
    h('p', { class: 'muted', text: 'Paste an API key with the read scope. It is kept in this tab only (sessionStorage) and sent in the Authorization header.' }),
    input, error,
    h('button', { class: 'primary', type: 'submit', text: 'Sign in' }));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setKey(key);
    try {
      await api('/api/v1/projects');
      input.value = '';
      route();
    } catch (err) {
      setKey(null);
      error.textContent = err.status === 401 ? 'That key is not valid.'
        : err.status === 403 ? 'That key cannot read (it needs the read scope).'
          : `Sign-in failed: ${err.message}`;
    }
  });
  main.append(form);
  input.focus();
}

function renderNav(parts) {
  clear(nav);
  nav.append(h('a', { href: '#/runs', text: 'Runs', 'aria-current': parts[0] === 'runs' ? 'page' : null }));
}

async function route() {
  if (!session.authDisabled && !session.key) { showSignIn(); return; }
  stopView();
  signout.hidden = session.authDisabled;
  const { parts, params } = parseHash();
  renderNav(parts);
  clear(main);
  const ctx = { main, params, navigate, mark, debug };
  try {
    if (parts[0] === 'run' && parts[1]) current = await renderRun(ctx, parts[1]);
    else if (parts[0] === 'compare') current = await renderCompare(ctx);
    else current = await renderRuns(ctx);
  } catch (err) {
    if (err.status === 401) return; // sign-in is showing
    main.append(h('p', { class: 'error', text: `Could not load this page: ${err.message}` }));
  }
}

signout.addEventListener('click', () => { setKey(null); showSignIn(); });
window.addEventListener('hashchange', route);

async function start() {
  const config = uiConfig().then((c) => { session.authDisabled = Boolean(c.auth_disabled); })
    .catch(() => { /* sign-in still works; the banner says why reads fail */ });
  // Signed in already (a reload): no need to wait for the config before the first page.
  if (!session.key) await config;
  route();
  await config;
  signout.hidden = session.authDisabled;
  checkReady();
}

start();
