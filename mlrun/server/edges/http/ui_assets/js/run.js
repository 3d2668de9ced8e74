// A run: fields, params, tags, metric summaries, one chart per metric grouped by name prefix,
// system metrics, artifacts. Each chart asks for about as many points as it is pixels wide,
// with `minmax` buckets (first, min, max, last of each), so a one-point spike is always drawn.
// Dragging over a chart re-queries that step range for every chart at full resolution; a
// running run gets new points incrementally (raw points after the last step held, every
// second), never by refetching whole series. State (x axis, log, smoothing, zoom) is in the URL.
import { api, query } from './api.js';
import { Chart, plotWidth } from './chart.js';
import { afterPaint, clear, fmtDuration, fmtNumber, fmtTime, h, statusBadge } from './dom.js';

const LIVE_SERIES_MS = 1000;
const LIVE_RUN_MS = 3000;
const MAX_NAMES = 100;
const RAW_PAGE = 10000;

export function escapeName(name) { return name.replace(/\\/g, '\\\\').replace(/,/g, '\\,'); }
export function groupOf(name) { const i = name.indexOf('/'); return i > 0 ? name.slice(0, i) : ''; }
function chunks(list, size) {
  const out = [];
  for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

export async function renderRun(ctx, runId) {
  const { main, params, navigate, mark, debug } = ctx;
  const state = {
    x: ['step', 'relative', 'wall'].includes(params.get('x')) ? params.get('x') : 'step',
    log: params.get('log') === '1',
    smooth: Math.min(0.99, Math.max(0, Number(params.get('smooth')) || 0)),
    zoom: /^\d+-\d+$/.test(params.get('zoom') || '') ? params.get('zoom').split('-').map(Number) : null,
  };
  const base = `/api/v1/runs/${encodeURIComponent(runId)}`;
  let run = await api(base);
  const startMs = Date.parse(run.created_at);
  const series = new Map(); // name -> { steps, values, ts, chart, system }
  const timers = [];
  let stopped = false;

  function urlParams() {
    const out = new URLSearchParams();
    if (state.x !== 'step') out.set('x', state.x);
    if (state.log) out.set('log', '1');
    if (state.smooth > 0) out.set('smooth', String(state.smooth));
    if (state.zoom) out.set('zoom', `${state.zoom[0]}-${state.zoom[1]}`);
    return out;
  }
  const path = `/run/${encodeURIComponent(runId)}`;

  // --- header, fields, params, tags, summaries -----------------------------------------
  const title = h('h1', { id: 'run-title' });
  const fields = h('table', { class: 'kv', id: 'run-fields' });
  const paramsTable = h('table', { class: 'kv', id: 'run-params' });
  const tagsTable = h('table', { class: 'kv', id: 'run-tags' });
  const summaries = h('table', { id: 'run-summaries' });
  function kvRows(table, entries, empty) {
    clear(table);
    if (entries.length === 0) table.append(h('tr', null, h('td', { class: 'muted', text: empty })));
    for (const [k, v] of entries) table.append(h('tr', null, h('td', { text: k }), h('td', null, v)));
  }
  function renderHeader() {
    clear(title).append(run.name || run.run_id, ' ', statusBadge(run.status));
    kvRows(fields, [['run id', run.run_id], ['project', run.project], ['created', fmtTime(run.created_at)],
      ['finished', fmtTime(run.finished_at)], ['duration', fmtDuration(run.duration_s)],
      ['last heartbeat', fmtTime(run.last_heartbeat_at)], ['artifacts', String(run.artifacts_count)]], '');
    kvRows(paramsTable, Object.entries(run.params).sort(), 'no params');
    kvRows(tagsTable, Object.entries(run.tags).sort(), 'no tags');
    clear(summaries).append(h('thead', null, h('tr', null,
      ['metric', 'last', 'step', 'min', 'max', 'count'].map((c) => h('th', { scope: 'col', text: c })))));
    summaries.append(h('tbody', null, run.metrics_summary.map((s) => h('tr', null,
      h('td', { text: s.name }), [s.last_value, s.last_step, s.min, s.max, s.count].map(
        (v) => h('td', { class: 'num', text: fmtNumber(v) }))))));
  }

  // --- controls ----------------------------------------------------------------------------
  const xSelect = h('select', { id: 'x-axis', 'aria-label': 'x axis' },
    [['step', 'step'], ['relative', 'relative time'], ['wall', 'wall time']].map(
      ([v, label]) => h('option', { value: v, text: label, selected: v === state.x })));
  const logBox = h('input', { type: 'checkbox', id: 'log-scale', checked: state.log });
  const smoothInput = h('input', { type: 'range', id: 'smoothing', min: '0', max: '0.99', step: '0.01',
    value: String(state.smooth), 'aria-label': 'EMA smoothing' });
  const smoothLabel = h('span', { class: 'muted', text: state.smooth.toFixed(2) });
  const resetZoom = h('button', { type: 'button', id: 'reset-zoom', text: 'Reset zoom', disabled: !state.zoom });
  const liveNote = h('span', { class: 'muted', id: 'live-note' });
  const controls = h('div', { class: 'toolbar' },
    h('label', { for: 'x-axis' }, 'x: ', xSelect), h('label', null, logBox, ' log scale'),
    h('label', { for: 'smoothing' }, 'smoothing ', smoothInput), smoothLabel, resetZoom,
    h('span', { class: 'spacer' }), liveNote);
  const chartsEl = h('div', { class: 'charts', id: 'charts' });
  const systemEl = h('div', { class: 'charts', id: 'system-charts' });
  const artifactsEl = h('div', { id: 'artifacts' });
  main.append(title,
    h('div', { class: 'grid' },
      h('div', null, h('h2', { text: 'Run' }), fields),
      h('div', null, h('h2', { text: 'Params' }), paramsTable),
      h('div', null, h('h2', { text: 'Tags' }), tagsTable)),
    h('h2', { text: 'Metrics' }), controls, chartsEl,
    h('h2', { text: 'Summaries' }), h('div', { class: 'tablewrap' }, summaries),
    h('h2', { text: 'System metrics' }), systemEl,
    h('h2', { text: 'Artifacts' }), artifactsEl);
  renderHeader();

  function redrawAll() {
    for (const s of series.values()) {
      s.chart.xMode = s.system && state.x === 'step' ? 'relative' : state.x;
      s.chart.log = state.log; s.chart.smoothing = state.smooth;
      s.chart.destroy();
      drawSeries(s);
    }
  }
  function settingsChanged() { navigate(path, urlParams(), { replace: true }); redrawAll(); }
  xSelect.addEventListener('change', () => { state.x = xSelect.value; settingsChanged(); });
  logBox.addEventListener('change', () => { state.log = logBox.checked; settingsChanged(); });
  smoothInput.addEventListener('input', () => {
    state.smooth = Number(smoothInput.value); smoothLabel.textContent = state.smooth.toFixed(2);
    settingsChanged();
  });
  resetZoom.addEventListener('click', () => setZoom(null));

  // --- charts ------------------------------------------------------------------------------
  function xOf(s) {
    const mode = s.chart.xMode;
    if (mode === 'step') return s.steps;
    if (mode === 'wall') return s.ts.map((t) => t / 1000);
    return s.ts.map((t) => (t - startMs) / 1000);
  }
  function drawSeries(s) {
    s.el.classList.toggle('nodata', s.steps.length === 0);
    if (s.steps.length === 0) return;
    s.chart.setLines([{ label: s.name, colour: s.system ? '#8a4fd0' : '#2457c5', x: xOf(s), y: s.values }]);
  }
  function ensureSeries(name, system) {
    const key = system ? `system:${name}` : name;
    let s = series.get(key);
    if (s) return s;
    const plotEl = h('div', { class: 'plot' });
    const el = h('div', { class: 'chart nodata', dataset: { metric: name, system: system ? '1' : '' } },
      plotEl, h('p', { class: 'muted nodata-note', text: '' }));
    const chart = new Chart(plotEl, {
      title: name, xMode: system && state.x === 'step' ? 'relative' : state.x, log: state.log,
      smoothing: state.smooth, syncKey: `run:${runId}:${system ? 'sys' : 'm'}`,
      onSelect: system ? null : (lo, hi) => zoomTo(s, lo, hi),
      onResetZoom: system ? null : () => setZoom(null),
    });
    s = { name, system, steps: [], values: [], ts: [], chart, el };
    series.set(key, s);
    const container = system ? systemEl : chartsEl;
    if (!system) {
      const group = groupOf(name);
      let heading = container.querySelector(`[data-group="${CSS.escape(group)}"]`);
      if (!heading) {
        heading = h('h3', { class: 'group-title', dataset: { group }, text: group ? `${group}/` : 'other' });
        container.append(heading);
      }
      // keep a group's charts together, right after its heading (or its last chart)
      let after = heading;
      while (after.nextElementSibling && after.nextElementSibling.classList.contains('chart')) after = after.nextElementSibling;
      after.after(el);
    } else {
      container.append(el);
    }
    return s;
  }
  debug.cursorLeft = (name) => series.get(name)?.chart.plot?.cursor.left ?? null;
  debug.plotted = (name) => {
    const s = series.get(name);
    return s?.chart.plot ? s.chart.plot.data.map((column) => Array.from(column)) : null;
  };

  function zoomTo(s, lo, hi) {
    let range;
    if (s.chart.xMode === 'step') range = [Math.max(0, Math.floor(lo)), Math.ceil(hi)];
    else {
      const xs = xOf(s);
      const inside = [];
      for (let i = 0; i < xs.length; i++) if (xs[i] >= lo && xs[i] <= hi) inside.push(s.steps[i]);
      if (inside.length === 0) return;
      range = [Math.min(...inside), Math.max(...inside)];
    }
    if (range[1] <= range[0]) range[1] = range[0] + 1;
    setZoom(range);
  }
  function setZoom(range) {
    state.zoom = range;
    resetZoom.disabled = !range;
    navigate(path, urlParams());
    loadMetrics();
  }

  function budget() {
    // as many points as the chart is pixels wide (device pixels)
    const first = chartsEl.querySelector('.chart') || chartsEl;
    return Math.min(100000, Math.max(64, Math.round(plotWidth(first) * (window.devicePixelRatio || 1))));
  }

  async function fetchSeries(names, system, extra) {
    const out = [];
    // no names: every series of the run, in one request
    for (const group of names.length ? chunks(names, MAX_NAMES) : [[]]) {
      // layout=columns: steps, values and timestamps as arrays, what the charts draw (the
      // server then builds no object per point, and the answer is ~2.4x smaller)
      const result = await api(`${base}/${system ? 'system_metrics' : 'metrics'}${query({
        names: group.map(escapeName).join(','), layout: 'columns', ...extra })}`, { quiet: extra.method === 'raw' });
      out.push(...result.series);
    }
    return out;
  }

  function fill(s, one) {
    s.steps = one.steps;
    s.values = one.values;
    s.ts = one.timestamps;
  }

  let metricsRequest = 0;
  async function loadMetrics() {
    const names = run.metrics_summary.map((m) => m.name).sort();
    const request = ++metricsRequest;
    for (const name of names) ensureSeries(name, false);
    if (names.length === 0) {
      clear(chartsEl).append(h('p', { class: 'empty', id: 'no-metrics', text: 'This run has no metrics yet.' }));
      return;
    }
    chartsEl.querySelector('#no-metrics')?.remove();
    const extra = { max_points: budget(), method: 'minmax' };
    if (state.zoom) { extra.start_step = state.zoom[0]; extra.end_step = state.zoom[1]; }
    liveNote.textContent = state.zoom ? `zoomed to steps ${state.zoom[0]}–${state.zoom[1]}` : '';
    const got = await fetchSeries(names, false, extra);
    if (stopped || request !== metricsRequest) return;
    mark('series-arrived');
    for (const one of got) {
      const s = ensureSeries(one.name, false);
      fill(s, one);
      drawSeries(s);
    }
    afterPaint(() => mark('charts-drawn'));
  }

  async function loadSystem() {
    const got = await fetchSeries([], true, { max_points: budget(), method: 'minmax' });
    if (stopped) return;
    if (got.length === 0 && !systemEl.querySelector('.chart')) {
      clear(systemEl).append(h('p', { class: 'muted', text: 'No system metrics.' }));
    }
    for (const one of got) {
      systemEl.querySelector('p.muted')?.remove();
      const s = ensureSeries(one.name, true);
      fill(s, one);
      drawSeries(s);
    }
  }

  async function loadArtifacts() {
    const { artifacts } = await api(`${base}/artifacts`);
    clear(artifactsEl);
    if (artifacts.length === 0) { artifactsEl.append(h('p', { class: 'muted', text: 'No artifacts.' })); return; }
    artifactsEl.append(h('div', { class: 'tablewrap' }, h('table', { id: 'artifacts-table' },
      h('thead', null, h('tr', null, ['name', 'type', 'size', 'created', ''].map((c) => h('th', { scope: 'col', text: c })))),
      h('tbody', null, artifacts.map((a) => {
        const button = h('button', { type: 'button', class: 'download', text: 'Download', dataset: { artifactId: a.artifact_id } });
        button.addEventListener('click', async () => {
          // The URL is presigned and short-lived: asked for at the click, never stored.
          const { download_url: url } = await api(`${base}/artifacts/${encodeURIComponent(a.artifact_id)}/download`);
          const link = h('a', { href: url, download: a.name.split('/').pop(), rel: 'noopener noreferrer', class: 'hidden' });
          document.body.append(link);
          link.click();
          link.remove();
        });
        return h('tr', null, h('td', { text: a.name }), h('td', { text: a.type }),
          h('td', { class: 'num', text: fmtNumber(a.size_bytes) }), h('td', { text: fmtTime(a.created_at) }),
          h('td', null, button));
      })))));
  }

  // --- live updates --------------------------------------------------------------------------
  let liveBusy = false;
  async function liveSeries() {
    if (stopped || liveBusy || run.status !== 'running' || state.zoom) return;
    liveBusy = true;
    try {
      // Series without points yet arrive through liveRun (a new name in the summaries).
      const metric = [...series.values()].filter((s) => !s.system && s.steps.length > 0);
      if (metric.length > 0) {
        const after = Math.min(...metric.map((s) => s.steps[s.steps.length - 1])) + 1;
        const got = await fetchSeries(metric.map((s) => s.name), false,
          { method: 'raw', start_step: after, max_points: RAW_PAGE });
        for (const one of got) {
          const s = series.get(one.name);
          if (!s) continue;
          const lastStep = s.steps.length ? s.steps[s.steps.length - 1] : -1;
          let from = 0; // steps come in order: the fresh ones are a tail
          while (from < one.steps.length && one.steps[from] <= lastStep) from++;
          if (from === one.steps.length) continue;
          s.steps.push(...one.steps.slice(from));
          s.values.push(...one.values.slice(from));
          s.ts.push(...one.timestamps.slice(from));
          debug.lastLiveAt = performance.now();
          drawSeries(s);
        }
        // A long live session: once the raw tail outgrows the budget, one downsampled read.
        if (metric.some((s) => s.steps.length > 8 * budget())) await loadMetrics();
      }
    } catch { /* the banner and sign-in handle what matters; the next tick retries */ }
    finally { liveBusy = false; }
  }
  async function liveRun() {
    if (stopped) return;
    try {
      const fresh = await api(base, { quiet: true });
      const known = new Set(run.metrics_summary.map((m) => m.name));
      const added = fresh.metrics_summary.some((m) => !known.has(m.name));
      const wasRunning = run.status === 'running';
      run = fresh;
      renderHeader();
      if (added) await loadMetrics();
      if (wasRunning && run.status !== 'running') await loadMetrics();
      if (run.status === 'running') await loadSystem();
    } catch { /* retried on the next tick */ }
  }
  const tick = (fn, ms) => {
    const handle = setInterval(fn, ms);
    timers.push(() => clearInterval(handle));
  };

  let resizeTimer = null;
  const onResize = () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { for (const s of series.values()) s.chart.resize(); }, 150);
  };
  window.addEventListener('resize', onResize);

  await Promise.all([loadMetrics(), loadSystem(), loadArtifacts()]);
  if (run.status === 'running') {
    tick(liveSeries, LIVE_SERIES_MS);
    tick(liveRun, LIVE_RUN_MS);
  }
  return () => {
    stopped = true;
    for (const stop of timers) stop();
    window.removeEventListener('resize', onResize);
    for (const s of series.values()) s.chart.destroy();
  };
}
