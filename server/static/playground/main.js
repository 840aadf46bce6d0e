// The playground page: request form, stack editor, side-by-side streams, sweeps,
// artifacts and "copy as". Every server error is shown as a message, never an alert.

import { api, apiKey, ApiError, setApiKey, streamGenerate } from "./api.js";
import { chart } from "./plot.js";
import { StackEditor } from "./stack.js";

const $ = (id) => document.getElementById(id);
const stack = new StackEditor($("stack"), refreshRequest);
let lastSweep = null;

// ------------------------------------------------------------------ messages

function show(box, text, ok = false) {
  box.textContent = text;
  box.classList.toggle("ok", ok);
  box.hidden = !text;
}
const describe = (e) => (e instanceof ApiError ? e.describe() : String(e.message || e));

// ------------------------------------------------------------------ the request

/** The steered request exactly as sent (the page adds only `stream: true`). */
function buildRequest() {
  const body = {};
  if (document.querySelector("input[name=mode]:checked").value === "chat") {
    const messages = [];
    if ($("chat-system").value.trim()) messages.push({ role: "system", content: $("chat-system").value });
    messages.push({ role: "user", content: $("chat-user").value });
    body.messages = messages;
  } else {
    body.prompt = $("prompt").value;
  }
  for (const [id, parse] of [["max_tokens", parseInt], ["temperature", Number], ["top_p", Number],
    ["top_k", parseInt], ["seed", parseInt]]) {
    const raw = $(id).value.trim();
    if (raw !== "") body[id] = parse(raw);
  }
  body.steering = stack.toWire();
  body.diagnostics = "steps";
  return body;
}

const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;

function pyLiteral(v, indent = "") {
  if (v === null) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "number") return String(v);
  const inner = indent + "    ";
  if (Array.isArray(v)) {
    if (!v.length) return "[]";
    return `[\n${v.map((x) => inner + pyLiteral(x, inner)).join(",\n")},\n${indent}]`;
  }
  const items = Object.entries(v);
  if (!items.length) return "{}";
  return `{${items.map(([k, x]) => `${JSON.stringify(k)}: ${pyLiteral(x, indent)}`).join(", ")}}`;
}

function copyAs(body) {
  const auth = apiKey() ? ` \\\n  -H "Authorization: Bearer $STEER_API_KEY"` : "";
  $("copy-curl").textContent = `curl -s ${location.origin}/v1/generate \\\n`
    + `  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(JSON.stringify(body))}`;
  const { prompt, ...options } = body;
  const args = [prompt !== undefined ? `    ${pyLiteral(prompt)},` : null,
    ...Object.entries(options).map(([k, v]) => `    ${k}=${pyLiteral(v, "    ")},`)]
    .filter(Boolean).join("\n");
  $("copy-python").textContent = "import os\n\nfrom clients import SteerClient\n\n"
    + `client = SteerClient(${JSON.stringify(location.origin)}, api_key=os.environ.get("STEER_API_KEY"))\n`
    + `r = client.generate(\n${args}\n)\nprint(r.text)\nprint(r.diagnostics)\n`;
}

function refreshRequest() {
  const body = buildRequest();
  $("request-json").textContent = JSON.stringify(body, null, 2);
  copyAs(body);
  const paths = stack.sweepPaths();
  $("sweep-paths").replaceChildren(...paths.map((p) => Object.assign(
    document.createElement("option"), { value: p })));
}

// ------------------------------------------------------------------ side by side

const COLOR = "255, 140, 0";

function perStepValue(metric, steps, i) {
  const xs = steps[metric];
  if (!xs || xs[i] === undefined) return null;
  return metric === "style_nll" ? -xs[i] : xs[i];  // shown as a log-probability
}

/** Color each streamed span of the steered text by the chosen per-step metric. */
function colorTokens(spans, diagnostics) {
  const steps = (diagnostics && diagnostics.per_step) || {};
  const metric = $("color-by").value;
  const values = spans.map((s) => {
    const vs = [];
    for (let i = s.start; i < s.start + s.count; i++) {
      const v = perStepValue(metric, steps, i);
      if (v !== null) vs.push(v);
    }
    return vs.length ? Math.max(...vs) : null;
  });
  const known = values.filter((v) => v !== null);
  const lo = Math.min(...known, 0), hi = Math.max(...known, 0);
  spans.forEach((s, k) => {
    const v = values[k];
    if (v === null) { s.node.style.background = ""; s.node.title = ""; return; }
    const t = hi > lo ? (v - lo) / (hi - lo) : 0;
    s.node.style.background = `rgba(${COLOR}, ${(0.6 * t).toFixed(3)})`;
    s.node.title = `${metric === "style_nll" ? "style log-prob" : metric} = ${v.toPrecision(4)}`;
    s.node.dataset.value = String(v);
  });
}

/** The steered run's scalar diagnostics, three name/value pairs per table row. */
function diagnosticsTable(diag) {
  const rows = Object.entries(diag || {}).filter(([, v]) => typeof v === "number");
  const table = $("diagnostics");
  table.replaceChildren();
  for (let i = 0; i < rows.length; i += 3) {
    const tr = table.insertRow();
    for (const [k, v] of rows.slice(i, i + 3)) {
      tr.append(Object.assign(document.createElement("th"), { textContent: k }));
      tr.insertCell().textContent = Number.isInteger(v) ? v : v.toPrecision(4);
    }
  }
}

async function runColumn(body, box, spans) {
  let start = 0, last = null;
  await streamGenerate(body, (frame) => {
    if (frame.text || frame.token_ids.length) {
      const node = document.createElement("span");
      node.textContent = frame.text;
      box.append(node);
      spans.push({ node, start, count: frame.token_ids.length });
      start += frame.token_ids.length;
    }
    if (frame.finish_reason) last = frame;
  });
  return last;
}

async function generate() {
  const message = $("message");
  show(message, "");
  if ($("seed").value.trim() === "") {  // one seed for both columns, kept for "copy as"
    $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
    refreshRequest();
  }
  const steered = buildRequest();
  const base = { ...steered, steering: [], diagnostics: false };
  $("out-base").replaceChildren();
  $("out-steered").replaceChildren();
  $("receipt").replaceChildren();
  $("warnings").replaceChildren();
  const spans = [];
  $("generate").disabled = true;
  try {
    const [, done] = await Promise.all([
      runColumn(base, $("out-base"), []),
      runColumn(steered, $("out-steered"), spans),
    ]);
    const diag = done && done.diagnostics;
    colorTokens(spans, diag);
    diagnosticsTable(diag);
    $("color-by").onchange = () => colorTokens(spans, diag);
    for (const w of (done && done.warnings) || []) {
      $("warnings").append(Object.assign(document.createElement("div"), { textContent: w }));
    }
    const receipt = (done && done.receipt) || (diag && diag.receipt);
    if (receipt) {
      $("receipt").append(Object.assign(document.createElement("pre"), {
        textContent: `receipt: ${JSON.stringify(receipt, null, 2)}` }));
    }
    $("out-steered").dataset.done = "1";
  } catch (e) {
    show(message, describe(e));
  } finally {
    $("generate").disabled = false;
  }
}

// ------------------------------------------------------------------ sweeps

function tokenOverlap(a, b) {
  const n = Math.max(a.length, b.length);
  if (!n) return 1;
  let same = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] === b[i]) same++;
  return same / n;
}

function tokenJaccard(a, b) {
  const count = (xs) => xs.reduce((m, x) => m.set(x, (m.get(x) || 0) + 1), new Map());
  const ca = count(a), cb = count(b);
  let min = 0, max = 0;
  for (const t of new Set([...ca.keys(), ...cb.keys()])) {
    min += Math.min(ca.get(t) || 0, cb.get(t) || 0);
    max += Math.max(ca.get(t) || 0, cb.get(t) || 0);
  }
  return max ? min / max : 1;
}

const SWEEP_METRICS = ["style_ppl", "base_ppl", "js_mean", "argmax_flip_rate",
  "kl_base_steered_mean", "overlap", "jaccard", "completion_tokens"];

function parseValue(s) {
  try { return JSON.parse(s); } catch { return s; }
}

function sweepRows(path, results) {
  const ref = results.find((r) => r.params[path] === 0) || results[0];
  return results.map(({ params, response }) => ({
    value: params[path],
    text: response.text,
    ...Object.fromEntries(Object.entries(response.diagnostics || {})
      .filter(([, v]) => typeof v === "number")),
    completion_tokens: response.usage.completion_tokens,
    overlap: tokenOverlap(response.token_ids, ref.response.token_ids),
    jaccard: tokenJaccard(response.token_ids, ref.response.token_ids),
  }));
}

function drawSweep() {
  const { path, rows } = lastSweep;
  const metric = $("sweep-metric").value;
  const plots = $("sweep-plots");
  plots.replaceChildren();
  const label = path.split(".").pop();
  if (rows.some((r) => r.style_ppl !== undefined)) {
    const trade = chart({ title: "trade-off: style vs fluency", xLabel: "style PPL",
      yLabel: "base PPL", logX: true, logY: true,
      points: rows.map((r) => ({ x: r.style_ppl, y: r.base_ppl, label: `${label}=${r.value}` })) });
    trade.id = "plot-tradeoff";
    plots.append(trade);
  }
  const numeric = rows.every((r) => typeof r.value === "number");
  const byValue = chart({ title: `${metric} vs ${label}`, xLabel: label, yLabel: metric,
    points: rows.map((r, i) => ({ x: numeric ? r.value : i, y: r[metric], label: String(r.value) })) });
  byValue.id = "plot-metric";
  plots.append(byValue);
}

function sweepTable(rows) {
  const cols = ["value", ...SWEEP_METRICS.filter((m) => rows.some((r) => r[m] !== undefined)), "text"];
  const table = $("sweep-table");
  table.replaceChildren();
  table.insertRow().append(...cols.map((c) => Object.assign(document.createElement("th"), { textContent: c })));
  for (const r of rows) {
    const tr = table.insertRow();
    for (const c of cols) {
      const v = r[c];
      tr.insertCell().textContent = typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : v ?? "";
    }
  }
  return cols;
}

function csv(rows, cols) {
  const cell = (v) => {
    const s = v === undefined || v === null ? "" : String(v);
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  return [cols, ...rows.map((r) => cols.map((c) => r[c]))].map((line) => line.map(cell).join(",")).join("\r\n") + "\r\n";
}

async function runSweep() {
  const message = $("message");
  show(message, "");
  const path = $("sweep-path").value.trim();
  const values = $("sweep-values").value.split(",").map((s) => s.trim()).filter(Boolean).map(parseValue);
  if ($("seed").value.trim() === "") {  // common random numbers: one seed for every point
    $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
    refreshRequest();
  }
  const request = { ...buildRequest(), diagnostics: true };
  $("run-sweep").disabled = true;
  try {
    const answer = await api.post("/v1/sweep", { request, grid: { [path]: values } });
    const rows = sweepRows(path, answer.results);
    const cols = sweepTable(rows);
    lastSweep = { path, rows, cols };
    const metrics = SWEEP_METRICS.filter((m) => rows.some((r) => r[m] !== undefined));
    const keep = $("sweep-metric").value;
    $("sweep-metric").replaceChildren(...metrics.map((m) => Object.assign(
      document.createElement("option"), { value: m, textContent: m })));
    $("sweep-metric").value = metrics.includes(keep) ? keep : metrics[0];
    drawSweep();
    $("sweep-csv").disabled = false;
  } catch (e) {
    show(message, describe(e));
  } finally {
    $("run-sweep").disabled = false;
  }
}

function downloadCsv() {
  const blob = new Blob([csv(lastSweep.rows, lastSweep.cols)], { type: "text/csv" });
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob),
    download: "sweep.csv" });
  a.click();
  URL.revokeObjectURL(a.href);
}

// ------------------------------------------------------------------ artifacts

function artifactItem(name, detail, onDelete, extra) {
  const li = document.createElement("li");
  li.append(`${name} `, Object.assign(document.createElement("span"), { className: "muted",
    textContent: detail }));
  if (extra) li.append(extra);
  li.append(Object.assign(document.createElement("button"), { textContent: "delete", onclick: onDelete }));
  return li;
}

async function artifactAction(fn, done) {
  const box = $("artifact-message");
  show(box, "working…", true);
  try {
    await fn();
    show(box, done, true);
    await loadArtifacts();
  } catch (e) {
    show(box, describe(e));
  }
}

async function loadArtifacts() {
  const [priors, vectors] = await Promise.all([api.get("/v1/priors"), api.get("/v1/control-vectors")]);
  $("prior-list").replaceChildren(...priors.data.map((p) => artifactItem(p.name,
    `${p.estimator}, ${p.corpus.tokens} tokens`,
    () => artifactAction(() => api.del(`/v1/priors/${encodeURIComponent(p.name)}`), `deleted ${p.name}`))));
  $("vector-list").replaceChildren(...vectors.data.map((v) => {
    const exp = Object.assign(document.createElement("button"), { textContent: "GGUF",
      onclick: () => artifactAction(async () => {
        const blob = await api.blob(`/v1/control-vectors/${encodeURIComponent(v.name)}/gguf`);
        const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob),
          download: `${v.name}.gguf` });
        a.click();
      }, `exported ${v.name}.gguf`) });
    return artifactItem(v.name, `${(v.layers || []).length} layers`,
      () => artifactAction(() => api.del(`/v1/control-vectors/${encodeURIComponent(v.name)}`),
        `deleted ${v.name}`), exp);
  }));
  stack.setChoices({ priors: priors.data.map((p) => p.name), vectors: vectors.data.map((v) => v.name) });
}

function words(id) { return $(id).value.split(",").map((s) => s.trim()).filter(Boolean); }

function bindArtifacts() {
  $("build-prior").onclick = () => {
    const body = { name: $("prior-name").value.trim() };
    if ($("prior-corpus").value) {
      body.corpus = $("prior-corpus").value;
      if ($("prior-max-docs").value) body.max_documents = parseInt($("prior-max-docs").value, 10);
    } else body.text = $("prior-text").value;
    artifactAction(() => api.post("/v1/priors", body), `built prior ${body.name}`);
  };
  $("extract-vector").onclick = () => {
    const body = { name: $("vector-name").value.trim(), template: $("vector-template").value,
      positive_words: words("vector-pos"), negative_words: words("vector-neg") };
    const layers = words("vector-layers").map(Number);
    if (layers.length) body.layers = layers;
    artifactAction(() => api.post("/v1/control-vectors", body), `extracted ${body.name}`);
  };
  $("import-gguf").onclick = () => {
    const file = $("gguf-file").files[0];
    const name = $("vector-name").value.trim();
    if (!file || !name) { show($("artifact-message"), "choose a .gguf file and a name first"); return; }
    artifactAction(() => api.put(`/v1/control-vectors/${encodeURIComponent(name)}/gguf`, file),
      `imported ${name}`);
  };
}

// ------------------------------------------------------------------ start-up

async function waitUntilReady() {
  const banner = $("banner");
  for (;;) {
    let status = 0, body = {};
    try {
      const resp = await fetch("/health", { headers: apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {} });
      status = resp.status;
      body = await resp.json().catch(() => ({}));
    } catch { status = 0; }
    if (status === 200) { banner.hidden = true; return; }
    banner.hidden = false;
    banner.textContent = status === 503
      ? `The server is ${body.status || "not ready"}${body.detail ? ": " + body.detail : ""}; retrying…`
      : status === 401 ? "The server needs an API key for /health: enter it above."
        : "Cannot reach the server; retrying…";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function loadServer() {
  const banner = $("banner");
  try {
    const models = await api.get("/v1/models");
    const main = models.data.find((m) => m.role === "main") || models.data[0];
    $("model-info").textContent = `${main.id} · ${main.source} · vocab ${main.vocab_size} · `
      + `context ${main.context_length} · ${main.dtype} on ${main.device}`;
    const aux = models.data.filter((m) => m.role !== "main");
    stack.setChoices({ experts: aux.filter((m) => m.role === "expert").map((m) => m.id),
      bases: aux.filter((m) => m.role !== "expert").map((m) => m.id) });
    const corpora = await api.get("/v1/corpora");
    $("prior-corpus").replaceChildren(Object.assign(document.createElement("option"),
      { value: "", textContent: "(pasted text)" }), ...corpora.data.filter((c) => c.installed)
      .map((c) => Object.assign(document.createElement("option"), { value: c.name, textContent: c.name })));
    await loadArtifacts();
    banner.hidden = true;
  } catch (e) {
    banner.hidden = false;
    banner.textContent = describe(e);
  }
}

function bind() {
  $("api-key").value = apiKey();
  $("api-key").onchange = () => { setApiKey($("api-key").value.trim()); refreshRequest(); loadServer(); };
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.onchange = () => {
      const chat = r.value === "chat" && r.checked;
      $("chat-box").hidden = !chat;
      $("prompt-box").hidden = chat;
      refreshRequest();
    };
  }
  for (const id of ["prompt", "chat-system", "chat-user", "max_tokens", "temperature", "top_p",
    "top_k", "seed"]) $(id).addEventListener("input", refreshRequest);
  $("add-entry").onclick = () => stack.add($("add-type").value);
  $("generate").onclick = generate;
  $("run-sweep").onclick = runSweep;
  $("sweep-metric").onchange = () => lastSweep && drawSweep();
  $("sweep-csv").onclick = downloadCsv;
  for (const b of document.querySelectorAll("[data-copy]")) {
    b.onclick = () => navigator.clipboard.writeText($(b.dataset.copy).textContent)
      .then(() => { b.textContent = "copied"; }, () => { b.textContent = "select and copy"; });
  }
  bindArtifacts();
}

bind();
refreshRequest();
waitUntilReady().then(loadServer).then(() => { document.body.dataset.ready = "1"; });
