// The read API from the browser. The API key lives in sessionStorage (this tab only, gone when
// it closes) and travels only in the Authorization header: never in a URL, never logged.
// A 401 drops the key and sends the page back to sign-in; a 503 or a network failure asks
// /ready and shows the banner.

const KEY_ITEM = 'mlrun.apiKey';
export const session = { key: sessionStorage.getItem(KEY_ITEM), authDisabled: false };
const listeners = { unauthorized: [], unavailable: [], busy: [] };
let inFlight = 0;

export function on(event, fn) { listeners[event].push(fn); }
function emit(event, ...args) { for (const fn of listeners[event]) fn(...args); }

export function setKey(key) {
  session.key = key;
  if (key) sessionStorage.setItem(KEY_ITEM, key); else sessionStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message || `HTTP ${status}`);
    this.status = status; this.code = code; this.field = field;
  }
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === '') continue;
    search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

export async function api(path, { method = 'GET', body, signal, quiet = false } = {}) {
  const headers = { Accept: 'application/json' };
  if (session.key) headers.Authorization = `Bearer ${session.key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (!quiet && ++inFlight === 1) emit('busy', true);
  let response;
  try {
    response = await fetch(path, {
      method, headers, signal, cache: 'no-store', credentials: 'omit',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name !== 'AbortError') emit('unavailable');
    throw error;
  } finally {
    if (!quiet && --inFlight === 0) emit('busy', false);
  }
  if (response.ok) return response.json();
  let detail = {};
  try { detail = (await response.json()).error || {}; } catch { /* not JSON */ }
  if (response.status === 401 && !session.authDisabled) emit('unauthorized', detail);
  if (response.status === 503) emit('unavailable');
  throw new ApiError(response.status, detail.code, detail.message, detail.field);
}

export async function ready() {
  // /ready answers 503 with the failing backends; both are JSON.
  const response = await fetch('/ready', { cache: 'no-store', credentials: 'omit' });
  const body = await response.json();
  return { ok: response.ok, body };
}

export async function uiConfig() {
  const response = await fetch('/ui/config.json', { cache: 'no-store', credentials: 'omit' });
  return response.json();
}

// Runs `tasks` (functions returning promises) at most `limit` at a time; results in order.
export async function bounded(tasks, limit) {
  const results = new Array(tasks.length);
  let next = 0;
  async function worker() {
    while (next < tasks.length) {
      const index = next++;
      results[index] = await tasks[index]();
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  return results;
}
