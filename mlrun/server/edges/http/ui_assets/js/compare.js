// Compare up to 100 runs: per metric one chart with a colour per run, one legend for the page
// (click a run to hide or show it on every chart), alignment by step, relative or absolute
// time, and a params table of the runs with the params that differ highlighted.
import { api, bounded } from './api.js';
import { Chart, plotWidth } from './chart.js';
import { afterPaint, clear, colour, fmtNumber, h, statusBadge } from './dom.js';

const MAX_RUNS = 100;
const MAX_SERIES = 1000; // the compare route's bound on runs x metrics
const DEFAULT_METRICS = 20; // what the route compares when no metric is named
const MAX_PAGE_POINTS = 200000; // points of every line of the page together

export async function renderCompare(ctx) {
  const { main, params, navigate, mark, debug } = ctx;
  const runIds = (params.get('runs') || '').split(',').filter(Boolean).slice(0, MAX_RUNS);
  const state = {
    align: ['step', 'relative_time', 'absolute_time'].includes(params.get('align')) ? params.get('align') : 'step',
    log: params.get('log') === '1',
    smooth: Math.min(0.99, Math.max(0, Number(params.get('smooth')) || 0)),
  };
  main.append(h('h1', { text: `Compare ${runIds.length} runs` }));
  if (runIds.length === 0) {
    main.append(h('p', { class: 'empty', text: 'Select runs in the runs table, then “Compare selected”.' }));
    return () => {};
  }
  const hidden = new Set();
  const charts = [];
  let result = null;
  let stopped = false;

  const alignSelect = h('select', { id: 'alignment', 'aria-label': 'alignment' },
    [['step', 'step'], ['relative_time', 'relative time'], ['absolute_time', 'absolute time']].map(
      ([v, label]) => h('option', { value: v, text: label, selected: v === state.align })));
  const logBox = h('input', { type: 'checkbox', id: 'log-scale', checked: state.log });
  const smoothInput = h('input', { type: 'range', id: 'smoothing', min: '0', max: '0.99', step: '0.01',
    value: String(state.smooth), 'aria-label': 'EMA smoothing' });
  const legend = h('div', { class: 'legend', id: 'legend', role: 'group', 'aria-label': 'Runs' });
  const note = h('p', { class: 'muted', id: 'compare-note' });
  const chartsEl = h('div', { class: 'charts', id: 'compare-charts' });
  const paramsEl = h('div', { id: 'compare-params' });
  main.append(h('div', { class: 'toolbar' },
    h('label', { for: 'alignment' }, 'align by ', alignSelect), h('label', null, logBox, ' log scale'),
    h('label', { for: 'smoothing' }, 'smoothing ', smoothInput)),
  legend, note, chartsEl, h('h2', { text: 'Params' }), paramsEl);

  function urlParams() {
    const out = new URLSearchParams({ runs: runIds.join(',') });
    if (state.align !== 'step') out.set('align', state.align);
    if (state.log) out.set('log', '1');
    if (state.smooth > 0) out.set('smooth', String(state.smooth));
    return out;
  }

  function lines(metric) {
    return result.runs.map((r, i) => {
      const s = r.series.find((one) => one.name === metric);
      const x = !s ? [] : state.align === 'step' ? s.steps : s.timestamps.map((t) => t / 1000);
      return { label: r.name || r.run_id, colour: colour(i), x, y: s ? s.values : [],
        show: !hidden.has(r.run_id) };
    });
  }

  function drawCharts() {
    for (const c of charts) c.destroy();
    charts.length = 0;
    clear(chartsEl);
    // the metrics the answer holds series of (the first common ones, as many as fit)
    const metrics = result.runs[0]?.series.map((s) => s.name) ?? [];
    if (metrics.length === 0) {
      chartsEl.append(h('p', { class: 'empty', text: 'These runs have no metric in common.' }));
      return;
    }
    for (const metric of metrics) {
      const plotEl = h('div', { class: 'plot' });
      chartsEl.append(h('div', { class: 'chart', dataset: { metric } }, plotEl));
      const chart = new Chart(plotEl, {
        title: metric, xMode: state.align === 'step' ? 'step' : state.align === 'absolute_time' ? 'wall' : 'relative',
        log: state.log, smoothing: state.smooth, syncKey: 'compare',
      });
      chart.metric = metric;
      chart.setLines(lines(metric));
      charts.push(chart);
    }
  }
  debug.plotted = (metric) => {
    const c = charts.find((one) => one.metric === metric);
    return c?.plot ? c.plot.data.map((column) => Array.from(column)) : null;
  };

  function drawLegend() {
    clear(legend);
    result.runs.forEach((r, i) => {
      const swatch = h('span', { class: 'swatch' });
      swatch.style.background = colour(i); // CSSOM, allowed by the CSP (no inline style attribute)
      const button = h('button', { type: 'button', 'aria-pressed': String(!hidden.has(r.run_id)),
        class: hidden.has(r.run_id) ? 'off' : null, dataset: { runId: r.run_id } },
      swatch, h('span', { text: r.name || r.run_id }), statusBadge(r.status));
      button.addEventListener('click', () => {
        if (hidden.has(r.run_id)) hidden.delete(r.run_id); else hidden.add(r.run_id);
        drawLegend();
        for (const c of charts) c.setLines(lines(c.metric));
      });
      legend.append(h('span', null, button, ' ', h('a', { href: `#/run/${encodeURIComponent(r.run_id)}`, text: '↗', 'aria-label': 'open run' })));
    });
  }

  async function load() {
    const width = plotWidth(chartsEl) > 1100 ? plotWidth(chartsEl) / 2 : plotWidth(chartsEl);
    // The server compares at most 1000 series (runs x metrics) at once: with many runs, the
    // first common metrics that fit (the common ones come from a request for no series).
    let metricNames;
    if (runIds.length * DEFAULT_METRICS > MAX_SERIES) {
      const { common_metrics: common } = await api('/api/v1/runs/compare', { method: 'POST',
        body: { run_ids: runIds, metric_names: [] } });
      metricNames = common.slice(0, Math.max(1, Math.floor(MAX_SERIES / runIds.length)));
      note.textContent = common.length > metricNames.length
        ? `Showing ${metricNames.length} of the ${common.length} metrics these runs share.` : '';
    }
    // As many points per line as the chart is pixels wide, within a bound for the whole page.
    const series = runIds.length * (metricNames?.length ?? DEFAULT_METRICS);
    const pixels = Math.round(width * (window.devicePixelRatio || 1));
    const budget = Math.max(64, Math.min(10000, pixels, Math.floor(MAX_PAGE_POINTS / series)));
    result = await api('/api/v1/runs/compare', { method: 'POST', body: {
      run_ids: runIds, alignment: state.align, method: 'minmax', max_points: budget, layout: 'columns',
      ...(metricNames ? { metric_names: metricNames } : {}) } });
    if (stopped) return;
    debug.compareBudget = budget;
    mark('compare-arrived');
    drawLegend();
    drawCharts();
    debug.drawnAlignment = state.align;
    afterPaint(() => mark('compare-drawn'));
  }

  async function loadParams() {
    const details = await bounded(runIds.map((id) => () => api(`/api/v1/runs/${encodeURIComponent(id)}`)), 6);
    if (stopped) return;
    const keys = [...new Set(details.flatMap((d) => Object.keys(d.params)))].sort();
    clear(paramsEl);
    if (keys.length === 0) { paramsEl.append(h('p', { class: 'muted', text: 'No params.' })); return; }
    const table = h('table', { id: 'params-table' },
      h('thead', null, h('tr', null, h('th', { scope: 'col', text: 'param' }),
        details.map((d, i) => {
          const swatch = h('span', { class: 'swatch' });
          swatch.style.background = colour(i);
          return h('th', { scope: 'col' }, swatch, ' ', d.name || d.run_id);
        }))),
      h('tbody', null, keys.map((k) => {
        const values = details.map((d) => (k in d.params ? d.params[k] : null));
        const differs = new Set(values.map((v) => (v === null ? '\u0000' : v))).size > 1;
        return h('tr', { class: differs ? 'diff' : null, dataset: { param: k } },
          h('th', { scope: 'row', text: k }),
          values.map((v) => h('td', { text: v === null ? '—' : fmtNumber(v) })));
      })));
    paramsEl.append(h('p', { class: 'muted', text: 'Highlighted rows differ between the runs.' }),
      h('div', { class: 'tablewrap' }, table));
  }

  alignSelect.addEventListener('change', () => { state.align = alignSelect.value; navigate('/compare', urlParams(), { replace: true }); load(); });
  logBox.addEventListener('change', () => {
    state.log = logBox.checked; navigate('/compare', urlParams(), { replace: true }); drawCharts();
  });
  smoothInput.addEventListener('input', () => {
    state.smooth = Number(smoothInput.value); navigate('/compare', urlParams(), { replace: true }); drawCharts();
  });

  await Promise.all([load(), loadParams()]);
  return () => { stopped = true; for (const c of charts) c.destroy(); };
}
