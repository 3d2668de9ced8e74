// The runs table: the listing API's filters and sorts, keyset paging (forward with the cursor,
// backward with a stack of cursors, "last page" by the reversed sort), a column chooser for
// run fields, params, tags and metric summaries, row selection (mouse or keyboard) for compare,
// running runs refreshed in place. Every piece of state is in the URL hash.
import { api, query } from './api.js';
import { afterPaint, append, clear, fmtDuration, fmtNumber, fmtTime, h, statusBadge } from './dom.js';

const STATUSES = ['running', 'finished', 'failed', 'killed'];
const BASE_COLUMNS = {
  status: { label: 'Status', cell: (r) => statusBadge(r.status), sort: 'status' },
  run_id: { label: 'Run id', cell: (r) => r.run_id },
  created_at: { label: 'Created', cell: (r) => fmtTime(r.created_at), sort: 'created_at' },
  updated_at: { label: 'Updated', cell: (r) => fmtTime(r.updated_at), sort: 'updated_at' },
  duration: { label: 'Duration', cell: (r) => fmtDuration(r.duration_s), sort: 'duration', num: true },
  tags: { label: 'Tags', cell: (r) => Object.entries(r.tags).map(([k, v]) => (v ? `${k}=${v}` : k)).join(', ') },
};
const DEFAULT_COLUMNS = 'status,created_at,duration,tags';
const SELECTION_ITEM = 'mlrun.selection';
const MAX_COMPARE = 100;
const REFRESH_MS = 5000;
const METRIC_COLUMN = /^m:(last|min|max):(.+)$/;
const MAX_COMPARE_SERIES = 1000;

// Last/min/max of some metrics for a page of runs, from the compare route: `minmax` with a
// budget of 6 returns the first and last stored points and one bucket's min and max points, so
// the series' min, max and last value are among them (no route of its own needed).
async function metricCells(runIds, names) {
  const cells = {};
  const per = Math.max(1, Math.min(MAX_COMPARE, Math.floor(MAX_COMPARE_SERIES / names.length)));
  const requests = [];
  for (let i = 0; i < runIds.length; i += per) {
    requests.push(api('/api/v1/runs/compare', { method: 'POST', quiet: true, body: {
      run_ids: runIds.slice(i, i + per), metric_names: names, method: 'minmax', max_points: 6,
      layout: 'columns' } }));
  }
  for (const result of await Promise.all(requests)) {
    for (const run of result.runs) {
      const byName = (cells[run.run_id] = {});
      for (const series of run.series) {
        const { steps, values } = series;
        if (steps.length === 0) continue;
        let last = 0;
        let min = Infinity;
        let max = -Infinity;
        for (let i = 0; i < steps.length; i++) {
          if (steps[i] >= steps[last]) last = i;
          if (values[i] < min) min = values[i];
          if (values[i] > max) max = values[i];
        }
        byName[series.name] = { last: values[last], min, max };
      }
    }
  }
  return cells;
}

function flip(sort) { return sort.startsWith('-') ? sort.slice(1) : `-${sort}`; }

function loadSelection() {
  try { return new Set(JSON.parse(sessionStorage.getItem(SELECTION_ITEM) || '[]')); } catch { return new Set(); }
}

export async function renderRuns(ctx) {
  const { main, params, navigate, mark } = ctx;
  const state = {
    project: params.get('project'), status: params.get('status') || '',
    tags: params.get('tags') || '', params: params.get('params') || '', q: params.get('q') || '',
    after: params.get('after') || '', before: params.get('before') || '',
    sort: params.get('sort') || '-created_at', limit: Number(params.get('limit')) || 100,
    cursor: params.get('cursor') || '', rev: params.get('rev') === '1',
    cols: (params.get('cols') ?? DEFAULT_COLUMNS).split(',').filter(Boolean),
  };
  const back = []; // cursors of the pages before this one (in the query's own direction)
  const selection = loadSelection();
  let page = null;
  let refreshTimer = null;
  let stopped = false;
  let controller = null;

  // With the project in the URL, the page of runs is asked for at once, next to the projects.
  const early = state.project !== null ? load().catch((err) => err) : null;
  const projects = (await api('/api/v1/projects')).projects.map((p) => p.name).sort();
  if (state.project === null) state.project = projects[0] ?? '';

  function urlParams() {
    const out = new URLSearchParams();
    const put = (k, v) => { if (v) out.set(k, v); };
    out.set('project', state.project);
    put('status', state.status); put('tags', state.tags); put('params', state.params);
    put('q', state.q); put('after', state.after); put('before', state.before);
    if (state.sort !== '-created_at') out.set('sort', state.sort);
    if (state.limit !== 100) out.set('limit', String(state.limit));
    if (state.cols.join(',') !== DEFAULT_COLUMNS) out.set('cols', state.cols.join(','));
    put('cursor', state.cursor);
    if (state.rev) out.set('rev', '1');
    return out;
  }

  // --- filters ---------------------------------------------------------------------------
  const projectSelect = h('select', { id: 'project', 'aria-label': 'Project' },
    h('option', { value: '', text: 'All projects' }),
    projects.map((p) => h('option', { value: p, text: p, selected: p === state.project })));
  const statusBoxes = STATUSES.map((s) => h('input', { type: 'checkbox', value: s, name: 'status',
    checked: state.status.split(',').includes(s) }));
  const text = (id, label, value, placeholder) => {
    const input = h('input', { type: 'text', id, value, placeholder, 'aria-label': label });
    return [h('label', { for: id }, label, input), input];
  };
  const [qLabel, qInput] = text('f-q', 'Search name / id', state.q, 'text');
  const [tagsLabel, tagsInput] = text('f-tags', 'Tags', state.tags, 'team=cv,gpu');
  const [paramsLabel, paramsInput] = text('f-params', 'Params', state.params, 'lr>=1e-3,opt=adam');
  const [afterLabel, afterInput] = text('f-after', 'Created after', state.after, '2024-03-01T00:00Z');
  const [beforeLabel, beforeInput] = text('f-before', 'Created before', state.before, 'ISO-8601');
  const [metricLabel, metricInput] = text('f-metric', 'Sort by metric (last)',
    state.sort.replace(/^-/, '').startsWith('metric:') ? state.sort.replace(/^-?metric:/, '') : '', 'loss');
  const limitSelect = h('select', { id: 'f-limit', 'aria-label': 'Rows per page' },
    [50, 100, 500, 1000].map((n) => h('option', { value: n, text: `${n} / page`, selected: n === state.limit })));
  const filters = h('form', { class: 'filters', id: 'filters' },
    h('label', { for: 'project' }, 'Project', projectSelect),
    h('fieldset', null, h('legend', { text: 'Status' }),
      statusBoxes.map((box) => h('label', null, box, box.value))),
    qLabel, tagsLabel, paramsLabel, afterLabel, beforeLabel, metricLabel,
    h('label', { for: 'f-limit' }, 'Page size', limitSelect),
    h('button', { type: 'submit', text: 'Apply' }));
  const error = h('p', { class: 'error', id: 'runs-error', 'aria-live': 'polite' });

  function readFilters() {
    state.project = projectSelect.value;
    state.status = statusBoxes.filter((b) => b.checked).map((b) => b.value).join(',');
    state.q = qInput.value.trim(); state.tags = tagsInput.value.trim();
    state.params = paramsInput.value.trim(); state.after = afterInput.value.trim();
    state.before = beforeInput.value.trim(); state.limit = Number(limitSelect.value);
    const metric = metricInput.value.trim();
    if (metric) state.sort = `${state.sort.startsWith('-') ? '-' : ''}metric:${metric}`;
    else if (state.sort.replace(/^-/, '').startsWith('metric:')) state.sort = '-created_at';
  }

  let debounce = null;
  function applySoon(delay) {
    clearTimeout(debounce);
    debounce = setTimeout(() => { readFilters(); restart(); }, delay);
  }
  filters.addEventListener('submit', (e) => { e.preventDefault(); applySoon(0); });
  filters.addEventListener('change', (e) => { if (e.target.type !== 'text') applySoon(0); });
  filters.addEventListener('input', (e) => { if (e.target.type === 'text') applySoon(500); });

  // --- toolbar: selection, columns, pager -----------------------------------------------
  const compareButton = h('button', { type: 'button', id: 'compare', class: 'primary' });
  const clearButton = h('button', { type: 'button', id: 'clear-selection', text: 'Clear selection' });
  const first = h('button', { type: 'button', id: 'page-first', text: '« First' });
  const prev = h('button', { type: 'button', id: 'page-prev', text: '◀ Prev' });
  const next = h('button', { type: 'button', id: 'page-next', text: 'Next ▶' });
  const last = h('button', { type: 'button', id: 'page-last', text: 'Last »' });
  const pageInfo = h('span', { class: 'muted', id: 'page-info' });
  const chooserButton = h('button', { type: 'button', id: 'columns', text: 'Columns ▾', 'aria-expanded': 'false' });
  const chooserMenu = h('div', { class: 'menu hidden', id: 'columns-menu' });
  const chooser = h('div', { class: 'chooser' }, chooserButton, chooserMenu);
  const toolbar = h('div', { class: 'toolbar' }, compareButton, clearButton, chooser,
    h('span', { class: 'spacer' }), pageInfo, h('div', { class: 'pager' }, first, prev, next, last));
  const table = h('table', { id: 'runs', 'aria-label': 'Runs' });
  const wrap = h('div', { class: 'tablewrap' }, table);
  main.append(h('h1', { text: 'Runs' }), filters, error, toolbar, wrap);

  function updateSelectionUi() {
    sessionStorage.setItem(SELECTION_ITEM, JSON.stringify([...selection]));
    compareButton.textContent = `Compare selected (${selection.size})`;
    compareButton.disabled = selection.size < 1 || selection.size > MAX_COMPARE;
    clearButton.disabled = selection.size === 0;
  }
  compareButton.addEventListener('click', () => {
    navigate('/compare', new URLSearchParams({ runs: [...selection].join(',') }));
    window.dispatchEvent(new HashChangeEvent('hashchange'));
  });
  clearButton.addEventListener('click', () => {
    selection.clear();
    for (const box of table.querySelectorAll('input.select')) box.checked = false;
    for (const row of table.querySelectorAll('tr.selected')) row.classList.remove('selected');
    updateSelectionUi();
  });
  chooserButton.addEventListener('click', () => {
    const open = chooserMenu.classList.toggle('hidden') === false;
    chooserButton.setAttribute('aria-expanded', String(open));
    if (open) fillChooser();
  });

  function fillChooser() {
    clear(chooserMenu);
    const keys = { p: new Set(), t: new Set() };
    for (const r of page?.runs ?? []) {
      Object.keys(r.params).forEach((k) => keys.p.add(k));
      Object.keys(r.tags).forEach((k) => keys.t.add(k));
    }
    for (const c of state.cols) {
      const m = /^([pt]):(.*)$/.exec(c);
      if (m) keys[m[1]].add(m[2]);
    }
    const option = (id, label) => {
      const box = h('input', { type: 'checkbox', value: id, checked: state.cols.includes(id) });
      box.addEventListener('change', () => {
        state.cols = box.checked ? [...state.cols, id] : state.cols.filter((c) => c !== id);
        navigate('/runs', urlParams(), { replace: true });
        renderTable();
      });
      return h('label', null, box, ' ', label);
    };
    chooserMenu.append(h('strong', { text: 'Run fields' }),
      Object.entries(BASE_COLUMNS).map(([id, def]) => option(id, def.label)));
    chooserMenu.append(h('strong', { text: 'Params' }),
      [...keys.p].sort().map((k) => option(`p:${k}`, k)));
    chooserMenu.append(h('strong', { text: 'Tags' }),
      [...keys.t].sort().map((k) => option(`t:${k}`, k)));
    const metricIds = state.cols.filter((c) => METRIC_COLUMN.test(c));
    const nameInput = h('input', { type: 'text', id: 'metric-column-name', list: 'metric-names',
      placeholder: 'metric name', 'aria-label': 'metric name' });
    const aggSelect = h('select', { id: 'metric-column-agg', 'aria-label': 'summary' },
      ['last', 'min', 'max'].map((a) => h('option', { value: a, text: a })));
    const names = h('datalist', { id: 'metric-names' });
    const add = h('button', { type: 'button', id: 'metric-column-add', text: 'Add' });
    add.addEventListener('click', () => {
      const name = nameInput.value.trim();
      const id = `m:${aggSelect.value}:${name}`;
      if (!name || state.cols.includes(id)) return;
      state.cols = [...state.cols, id];
      navigate('/runs', urlParams(), { replace: true });
      fillChooser();
      fillMetrics().then(renderTable);
    });
    chooserMenu.append(h('strong', { text: 'Metric summaries' }),
      metricIds.map((id) => option(id, id.replace(METRIC_COLUMN, '$2 ($1)'))),
      h('div', null, nameInput, aggSelect, add), names);
    // Suggestions: the metrics every run of this page has (the compare route's common_metrics).
    const ids = (page?.runs ?? []).slice(0, MAX_COMPARE).map((r) => r.run_id);
    if (ids.length) {
      api('/api/v1/runs/compare', { method: 'POST', quiet: true, body: { run_ids: ids, metric_names: [] } })
        .then((r) => append(names, r.common_metrics.map((n) => h('option', { value: n }))))
        .catch(() => {});
    }
  }

  async function fillMetrics(target = page) {
    const names = [...new Set(state.cols.map((c) => METRIC_COLUMN.exec(c)?.[2]).filter(Boolean))];
    if (!target || names.length === 0 || target.runs.length === 0) return;
    try {
      target.metrics = await metricCells(target.runs.map((r) => r.run_id), names);
    } catch (err) {
      if (err.status !== 401) error.textContent = `metric columns: ${err.message}`;
    }
  }

  function columnDefs() {
    return state.cols.map((id) => {
      if (BASE_COLUMNS[id]) return { id, ...BASE_COLUMNS[id] };
      const metric = METRIC_COLUMN.exec(id);
      if (metric) {
        const [, agg, name] = metric;
        return { id, label: `${name} (${agg})`, num: true, sort: agg === 'last' ? `metric:${name}` : null,
          cell: (r) => fmtNumber(page?.metrics?.[r.run_id]?.[name]?.[agg]) };
      }
      const m = /^([pt]):(.*)$/.exec(id);
      if (!m) return null;
      const key = m[2];
      return m[1] === 'p'
        ? { id, label: key, cell: (r) => r.params[key] ?? '', num: true }
        : { id, label: `#${key}`, cell: (r) => r.tags[key] ?? '' };
    }).filter(Boolean);
  }

  function sortHeader(label, column) {
    const th = h('th', { scope: 'col', text: label });
    if (!column) return th;
    const bare = state.sort.replace(/^-/, '');
    th.classList.add('sortable');
    th.tabIndex = 0;
    if (bare === column) th.classList.add(state.sort.startsWith('-') ? 'sorted-desc' : 'sorted-asc');
    th.setAttribute('aria-sort', bare === column ? (state.sort.startsWith('-') ? 'descending' : 'ascending') : 'none');
    const toggle = () => {
      state.sort = bare === column ? flip(state.sort) : column;
      metricInput.value = column.startsWith('metric:') ? column.slice('metric:'.length) : '';
      restart();
    };
    th.addEventListener('click', toggle);
    th.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); toggle(); } });
    return th;
  }

  function rowOf(run, defs) {
    const box = h('input', { type: 'checkbox', class: 'select', 'aria-label': 'Select run',
      checked: selection.has(run.run_id), tabindex: '-1' });
    const tr = h('tr', { class: 'runrow', tabindex: '0', dataset: { runId: run.run_id } },
      h('td', null, box),
      h('td', null, h('a', { href: `#/run/${encodeURIComponent(run.run_id)}`, class: 'runname',
        text: run.name || run.run_id, tabindex: '-1' })),
      defs.map((d) => h('td', { class: d.num ? 'num' : null }, d.cell(run))));
    if (selection.has(run.run_id)) tr.classList.add('selected');
    const toggle = () => {
      if (selection.has(run.run_id)) selection.delete(run.run_id); else selection.add(run.run_id);
      box.checked = selection.has(run.run_id);
      tr.classList.toggle('selected', box.checked);
      updateSelectionUi();
    };
    box.addEventListener('click', (e) => { e.stopPropagation(); toggle(); box.checked = selection.has(run.run_id); });
    tr.addEventListener('keydown', (e) => {
      if (e.target !== tr) return;
      if (e.key === ' ') { e.preventDefault(); toggle(); }
      else if (e.key === 'Enter') location.hash = `#/run/${encodeURIComponent(run.run_id)}`;
      else if (e.key === 'ArrowDown') { e.preventDefault(); tr.nextElementSibling?.focus(); }
      else if (e.key === 'ArrowUp') { e.preventDefault(); tr.previousElementSibling?.focus(); }
    });
    tr.dataset.json = JSON.stringify([run, page?.metrics?.[run.run_id]]);
    return tr;
  }

  function renderTable() {
    clear(table);
    const defs = columnDefs();
    table.append(h('thead', null, h('tr', null,
      h('th', { scope: 'col' }, h('span', { class: 'hidden', text: 'Select' })),
      sortHeader('Name', 'name'), defs.map((d) => sortHeader(d.label, d.sort)))));
    const rows = page ? (state.rev ? [...page.runs].reverse() : page.runs) : [];
    const body = h('tbody', null, rows.map((r) => rowOf(r, defs)));
    table.append(body);
    if (page && rows.length === 0) {
      body.append(h('tr', null, h('td', { class: 'empty', colspan: String(defs.length + 2),
        text: state.project ? `No runs in project “${state.project}” match.` : 'No runs match.' })));
    }
    const forwardMore = state.rev ? back.length > 0 : Boolean(page?.next_cursor);
    const backwardMore = state.rev ? Boolean(page?.next_cursor) : (back.length > 0 || Boolean(state.cursor));
    next.disabled = !forwardMore;
    prev.disabled = !backwardMore;
    first.disabled = !backwardMore;
    const bare = state.sort.replace(/^-/, '');
    last.disabled = !forwardMore || bare === 'duration' || bare.startsWith('metric:');
    const total = page?.total ?? page?.knownTotal;
    pageInfo.textContent = page ? `${rows.length} rows${total !== undefined && total !== null ? ` of ${total}` : ''}` : '';
  }

  async function load({ quiet = false } = {}) {
    controller?.abort();
    controller = new AbortController();
    const listed = await api(`/api/v1/runs${query({
      project: state.project, status: state.status, tags: state.tags, params: state.params,
      q: state.q, created_after: state.after, created_before: state.before,
      sort: state.rev ? flip(state.sort) : state.sort, limit: state.limit,
      cursor: state.cursor, include_total: state.cursor || quiet ? '' : 'true',
    })}`, { signal: controller.signal, quiet });
    listed.knownTotal = listed.total ?? page?.knownTotal ?? page?.total;
    return listed;
  }

  async function show({ quiet = false, prefetched = null } = {}) {
    try {
      const loaded = prefetched ? await prefetched : await load({ quiet });
      if (loaded instanceof Error) throw loaded;
      if (stopped) return;
      error.textContent = '';
      if (quiet && page) {
        await fillMetrics(loaded);
        if (!stopped) patchRows(loaded);
        return;
      }
      page = loaded;
      renderTable();
      afterPaint(() => mark('runs-painted'));
      if (state.cols.some((c) => METRIC_COLUMN.test(c))) {
        await fillMetrics();
        if (page === loaded && !stopped) { renderTable(); mark('metric-columns-filled'); }
      }
    } catch (err) {
      if (err.name === 'AbortError' || err.status === 401) return;
      error.textContent = err.field ? `${err.field}: ${err.message}` : err.message;
    } finally {
      scheduleRefresh();
    }
  }

  // Running runs update in place: the same page again, quietly; changed rows are replaced.
  function patchRows(loaded) {
    const defs = columnDefs();
    page = { ...loaded, knownTotal: page.knownTotal };
    for (const run of loaded.runs) {
      const tr = table.querySelector(`tr[data-run-id="${CSS.escape(run.run_id)}"]`);
      const json = JSON.stringify([run, page.metrics?.[run.run_id]]);
      if (tr && tr.dataset.json !== json) {
        const hadFocus = document.activeElement === tr;
        const fresh = rowOf(run, defs);
        tr.replaceWith(fresh);
        if (hadFocus) fresh.focus();
      }
    }
  }

  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    if (stopped || !page?.runs.some((r) => r.status === 'running')) return;
    refreshTimer = setTimeout(() => show({ quiet: true }), REFRESH_MS);
  }

  function restart() {
    state.cursor = ''; state.rev = false; back.length = 0;
    navigate('/runs', urlParams());
    page = null;
    show();
  }

  function go(cursor, rev) {
    state.cursor = cursor; state.rev = rev;
    navigate('/runs', urlParams());
    show();
  }
  next.addEventListener('click', () => {
    if (state.rev) go(back.pop() ?? '', true);
    else { back.push(state.cursor); go(page.next_cursor, false); }
  });
  prev.addEventListener('click', () => {
    if (state.rev) { back.push(state.cursor); go(page.next_cursor, true); }
    else go(back.pop() ?? '', false);
  });
  first.addEventListener('click', () => { back.length = 0; go('', false); });
  last.addEventListener('click', () => { back.length = 0; go('', true); });

  updateSelectionUi();
  navigate('/runs', urlParams(), { replace: true });
  renderTable();
  await show({ prefetched: early });
  return () => { stopped = true; clearTimeout(refreshTimer); clearTimeout(debounce); controller?.abort(); };
}
