// One uPlot chart: series drawn as lines (the raw, downsampled-by-minmax points, so a one-point
// spike is in what is plotted), an optional EMA drawn over the raw line, log scale, drag to
// select an x range (the page re-queries it), hover synced across the page by `syncKey`.
// Titles and labels reach uPlot as strings, which it sets with textContent.

const HEIGHT = 220;

// EMA with the TensorBoard debiasing, so the start is not pulled toward 0.
export function ema(values, weight) {
  const out = new Array(values.length);
  let last = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || !Number.isFinite(v)) { out[i] = null; continue; }
    last = last * weight + (1 - weight) * v;
    count++;
    out[i] = last / (1 - weight ** count);
  }
  return out;
}

const COMPACT = new Intl.NumberFormat(undefined, { notation: 'compact', maximumSignificantDigits: 4 });
// Axis labels short enough for the axis: 1e9 as "1B", 0.000123 as "1.23e-4".
export function compact(value) {
  if (value === null || value === undefined) return '';
  const size = Math.abs(value);
  if (size !== 0 && size < 1e-3) return value.toExponential(2);
  return COMPACT.format(value);
}

export function plotWidth(el) {
  return Math.max(200, Math.floor(el.getBoundingClientRect().width) || 500);
}

// `lines`: [{ label, colour, x: number[], y: number[], show }]. Every line gets its own x
// values; uPlot needs one x array, so lines are joined on the union of their x values
// (null where a line has no point: gaps are spanned).
export function joinLines(lines) {
  if (lines.length === 1) return [lines[0].x, lines[0].y];
  const xs = new Set();
  for (const line of lines) for (const x of line.x) xs.add(x);
  const x = Float64Array.from(xs).sort();
  const index = new Map();
  for (let i = 0; i < x.length; i++) index.set(x[i], i);
  const ys = lines.map((line) => {
    const y = new Array(x.length).fill(null);
    for (let i = 0; i < line.x.length; i++) y[index.get(line.x[i])] = line.y[i];
    return y;
  });
  return [Array.from(x), ...ys];
}

export class Chart {
  constructor(container, { title, xMode, log, smoothing, syncKey, onSelect, onResetZoom }) {
    this.container = container;
    this.title = title;
    this.xMode = xMode;
    this.log = log;
    this.smoothing = smoothing;
    this.syncKey = syncKey;
    this.onSelect = onSelect;
    this.onResetZoom = onResetZoom;
    this.lines = [];
    this.plot = null;
  }

  setLines(lines) {
    this.lines = lines;
    this.draw();
  }

  // The data uPlot draws: per line the raw values (and the EMA when smoothing is on).
  plotted() {
    const shown = this.lines;
    const transform = (v) => (this.log && !(v > 0) ? null : v);
    const raw = shown.map((l) => ({ ...l, y: l.y.map(transform) }));
    const series = [];
    const lines = [];
    for (const line of raw) {
      lines.push(line);
      series.push({ label: line.label, stroke: line.colour, width: this.smoothing > 0 ? 1 : 1.5,
        alpha: this.smoothing > 0 ? 0.35 : 1, show: line.show !== false });
      if (this.smoothing > 0) {
        lines.push({ ...line, y: ema(line.y, this.smoothing) });
        series.push({ label: `${line.label} (EMA)`, stroke: line.colour, width: 2, show: line.show !== false });
      }
    }
    return { data: joinLines(lines), series };
  }

  draw() {
    const { data, series } = this.plotted();
    const width = plotWidth(this.container);
    if (this.plot && this.plot.series.length === series.length + 1) {
      this.plot.setData(data);
      series.forEach((s, i) => { if (this.plot.series[i + 1].show !== s.show) this.plot.setSeries(i + 1, { show: s.show }); });
      return;
    }
    this.plot?.destroy();
    const chart = this;
    this.plot = new window.uPlot({
      title: this.title,
      width,
      height: HEIGHT,
      legend: { show: false },
      scales: { x: { time: this.xMode === 'wall' }, y: { distr: this.log ? 3 : 1 } },
      axes: [
        { label: { step: 'step', relative: 'seconds since start', wall: '' }[this.xMode],
          values: this.xMode === 'wall' ? undefined : (u, splits) => splits.map(compact) },
        { size: 56, values: (u, splits) => splits.map(compact) },
      ],
      series: [{}, ...series.map((s) => ({
        label: s.label, stroke: s.stroke, width: s.width, alpha: s.alpha, show: s.show,
        spanGaps: true, points: { show: false },
      }))],
      cursor: {
        sync: { key: this.syncKey },
        drag: { x: true, y: false, setScale: false },
      },
      hooks: {
        setSelect: [(u) => {
          if (u.select.width < 3) return;
          const lo = u.posToVal(u.select.left, 'x');
          const hi = u.posToVal(u.select.left + u.select.width, 'x');
          u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          chart.onSelect?.(lo, hi);
        }],
        ready: [(u) => {
          u.over.addEventListener('dblclick', () => chart.onResetZoom?.());
        }],
      },
    }, data, this.container);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: plotWidth(this.container), height: HEIGHT });
  }

  destroy() {
    this.plot?.destroy();
    this.plot = null;
  }
}
