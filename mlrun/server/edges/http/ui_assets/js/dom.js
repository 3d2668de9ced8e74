// Building DOM without HTML strings: every user-controlled value goes in as text (textContent),
// never through innerHTML, so a run named `<img src=x onerror=alert(1)>` is shown as those
// characters. The strict CSP (no inline script) is the second line of defence.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'class') el.className = value;
      else if (name === 'text') el.textContent = String(value);
      else if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
      else if (name === 'dataset') Object.assign(el.dataset, value);
      else if (value === true) el.setAttribute(name, '');
      else el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function fmtNumber(value) {
  if (value === null || value === undefined) return '';
  if (typeof value !== 'number') return String(value);
  if (value !== 0 && (Math.abs(value) >= 1e6 || Math.abs(value) < 1e-3)) return value.toExponential(4);
  return String(Math.round(value * 1e6) / 1e6);
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return '';
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} m`;
}

export function fmtTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function statusBadge(status) {
  return h('span', { class: `status status-${status}`, text: status });
}

// A colour per series index, far apart for neighbours (golden angle on the hue circle).
export function colour(index) {
  return `hsl(${Math.round((index * 137.508) % 360)}, 70%, 42%)`;
}

// Runs `fn` once the next frame has been laid out and painted (a frame callback runs before
// layout; a task queued from it runs after the frame).
export function afterPaint(fn) {
  requestAnimationFrame(() => setTimeout(fn, 0));
}
