// The operators' dashboard: /admin/metrics every POLL_MS as charts and tiles, model load/unload and
// the cache flush. The gateway refuses these routes to non-admins; hiding them here is only cosmetic.

import { api } from "./api.js";
import { byId, h } from "./dom.js";
import { format, LineChart } from "./chart.js";

const POLL_MS = 2000;

const CHARTS = [
  { id: "tokens", title: "Tokens/s", unit: "tokens/s" },
  { id: "ttft", title: "Time to first token (ms)", unit: "ms" },
  { id: "status", title: "Requests/s by status", unit: "requests/s" },
  { id: "slots", title: "Slots busy and queue", unit: "" },
  { id: "cache", title: "Cache hit ratio", unit: "", max: 1 },
  { id: "rss", title: "Process memory (RSS, MB)", unit: "MB" },
  { id: "cpu", title: "Process CPU (%)", unit: "%" },
];

const charts = new Map();
let timer = null;
let previous = null; // the last metrics and when they came

function buildCharts() {
  const holder = byId("charts");
  for (const spec of CHARTS) {
    const canvas = h("canvas", { attrs: { role: "img", "aria-label": spec.title } });
    const legend = h("ul", { className: "legend" });
    const figure = h(
      "figure",
      { className: "chart", dataset: { chart: spec.id } },
      h("figcaption", {}, spec.title),
      canvas,
      legend,
    );
    holder.append(figure);
    charts.set(spec.id, { chart: new LineChart(canvas, spec), legend, canvas, spec });
  }
}

/** Show the dashboard and poll until `stopDashboard`. */
export function startDashboard() {
  if (!charts.size) buildCharts();
  stopDashboard();
  poll();
  timer = setInterval(poll, POLL_MS);
}

export function stopDashboard() {
  if (timer !== null) clearInterval(timer);
  timer = null;
  previous = null;
}

async function poll() {
  const status = byId("dashboard-status");
  let metrics;
  try {
    metrics = await api("GET", "/admin/metrics");
  } catch (error) {
    status.textContent = `Metrics unavailable: ${error.message}`;
    return;
  }
  const now = performance.now();
  status.textContent = `Updated ${new Date().toLocaleTimeString()} (every ${POLL_MS / 1000} s)`;
  update(metrics, previous ? { metrics: previous.metrics, seconds: (now - previous.at) / 1000 } : null);
  previous = { metrics, at: now };
}

function milliseconds(seconds) {
  return seconds === undefined || seconds === null ? null : seconds * 1000;
}

function rate(now, before, seconds) {
  return before === null || seconds <= 0 ? null : Math.max(0, (now - before) / seconds);
}

function update(m, last) {
  const before = last ? last.metrics : null;
  const seconds = last ? last.seconds : 0;
  plot("tokens", {
    "output tokens/s": rate(m.tokens.output, before && before.tokens.output, seconds),
    "decode p50 per request": m.decode_tokens_per_s.p50 ?? null,
  });
  plot("ttft", {
    p50: milliseconds(m.ttft_s.p50),
    p95: milliseconds(m.ttft_s.p95),
  });
  const statuses = {};
  const classes = new Set([...Object.keys(m.requests.by_status), ...["2xx", "4xx", "5xx"]]);
  for (const name of [...classes].sort()) {
    statuses[name] = rate(m.requests.by_status[name] || 0, before && (before.requests.by_status[name] || 0), seconds);
  }
  plot("status", statuses);
  const slots = {};
  for (const [model, load] of Object.entries(m.models)) {
    slots[`${model} busy`] = load.busy;
    slots[`${model} queued`] = load.queued;
  }
  plot("slots", slots);
  plot("cache", { "hit ratio": m.cache.hit_ratio });
  plot("rss", { RSS: m.system.process_rss_bytes / 1048576 });
  plot("cpu", { CPU: m.system.process_cpu_percent });
  tiles(m);
  models(m.models);
}

function plot(id, values) {
  const { chart, legend, canvas, spec } = charts.get(id);
  chart.push(values);
  // the legend doubles as the chart's text alternative: the latest value of each series
  legend.replaceChildren(
    ...Object.entries(values).map(([name, value], i) =>
      h(
        "li",
        { dataset: { series: name } },
        h("span", { className: `swatch swatch-${i % 6}`, attrs: { "aria-hidden": "true" } }),
        `${name}: `,
        h("output", {}, format(value)),
      ),
    ),
  );
  const summary = Object.entries(values).map(([n, v]) => `${n} ${format(v)}`).join(", ");
  canvas.setAttribute("aria-label", `${spec.title}: ${summary}`);
}

function redisState(m) {
  const errors = typeof m.redis_errors === "object" && m.redis_errors !== null
    ? Object.values(m.redis_errors).reduce((a, b) => a + b, 0)
    : m.redis_errors || 0;
  if (m.cache.backend !== "redis") return `off (${m.cache.backend} cache)`;
  return `${m.cache.available ? "available" : "UNAVAILABLE"}, ${errors} errors`;
}

function tiles(m) {
  const items = [
    ["Uptime", `${Math.round(m.uptime_s)} s`],
    ["Requests", m.requests.total],
    ["Errors", m.requests.errors],
    ["Cancelled", m.requests.cancelled],
    ["Output tokens", m.tokens.output],
    ["Rate limited", m.rate_limited],
    ["Cache entries", m.cache.entries ?? "–"],
    ["Redis", redisState(m)],
  ];
  byId("tiles").replaceChildren(
    ...items.map(([name, value]) => h("div", { className: "tile" }, h("dt", {}, name), h("dd", {}, String(value)))),
  );
}

function models(loads) {
  byId("model-rows").replaceChildren(
    ...Object.entries(loads).map(([id, load]) => {
      const action = load.state === "ready" ? "unload" : "load";
      const button = h(
        "button",
        { type: "button", onclick: () => modelAction(id, action, button) },
        action === "load" ? "Load" : "Unload",
      );
      button.setAttribute("aria-label", `${action === "load" ? "Load" : "Unload"} ${id}`);
      return h(
        "tr",
        { dataset: { model: id } },
        h("th", { scope: "row" }, id),
        h("td", {}, load.state),
        h("td", {}, load.slots),
        h("td", {}, load.busy),
        h("td", {}, load.queued),
        h("td", {}, button),
      );
    }),
  );
}

async function modelAction(id, action, button) {
  button.disabled = true;
  const status = byId("dashboard-status");
  status.textContent = `${action === "load" ? "Loading" : "Unloading"} ${id}…`;
  try {
    await api("POST", `/admin/models/${encodeURIComponent(id)}/${action}`);
    status.textContent = `${id}: ${action}ed`;
  } catch (error) {
    status.textContent = `${id}: ${error.message}`;
  }
  poll();
}

byId("cache-flush").addEventListener("click", async () => {
  const result = byId("cache-result");
  try {
    const answer = await api("POST", "/admin/cache/flush");
    result.textContent = `Flushed ${answer.flushed} entries.`;
  } catch (error) {
    result.textContent = error.message;
  }
});
