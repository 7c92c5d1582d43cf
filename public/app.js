// The playground: health, one embeddings request (base64, decoded here), a cosine heatmap, a PCA map,
// and a small semantic search. Same origin only; the API key lives in sessionStorage, never in a URL.
"use strict";

const KEY_STORE = "embeddings-playground-api-key";
const $ = (id) => document.getElementById(id);

const state = { health: null, texts: [], vectors: [], model: null, dimensions: null };

// -- the API -------------------------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadHealth() {
  try {
    const response = await fetch("/api/health", { headers: { Accept: "application/json" } });
    const health = await response.json();
    if (!response.ok) throw new Error(health.error ? health.error.message : `HTTP ${response.status}`);
    state.health = health;
    showHealth(health);
  } catch (err) {
    showMessage("error", `Could not read the service's status: ${err.message}`);
  }
}

function decode(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer); // little-endian float32, as the cache stores it
}

async function embed(texts, model, dimensions) {
  const body = { input: texts, model, encoding_format: "base64" };
  if (dimensions) body.dimensions = dimensions;
  const started = performance.now();
  let response;
  try {
    response = await fetch("/v1/embeddings", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
  } catch (err) {
    throw new Error("Could not reach the server. Is the dev server still running?");
  }
  const latency = performance.now() - started;
  let answer = null;
  try {
    answer = await response.json();
  } catch (err) {
    answer = null;
  }
  if (!response.ok) throw new Error(explain(response.status, answer && answer.error));
  const vectors = answer.data.slice().sort((a, b) => a.index - b.index).map((d) => decode(d.embedding));
  return {
    vectors,
    latency,
    hits: Number(response.headers.get("x-cache-hits") || 0),
    misses: Number(response.headers.get("x-cache-misses") || 0),
    tokens: answer.usage ? answer.usage.prompt_tokens : 0,
    cacheError: response.headers.get("x-cache-error"),
    route: response.headers.get("x-embeddings-route"), // which route of the model paid for the misses
    model: answer.model,
  };
}

// The API's own message, with the few words a person needs to act on it.
function explain(status, error) {
  const said = error && error.message ? error.message : `HTTP ${status}`;
  const lines = said.replace(/'input\[(\d+)\]'/g, (_, i) => `line ${Number(i) + 1}`);
  if (status === 401) return `The API key was refused: ${said} Enter the right key in the API key field.`;
  if (error && error.code === "model_not_found") return `Unknown model: ${said}`;
  if (status === 400) return `The request was refused: ${lines}`;
  if (status === 429) return `The provider is rate limiting this server; try again shortly. (${said})`;
  if (status === 504) return `The provider did not answer in time: ${said}`;
  if (status >= 500) return `The embedding provider or the server failed: ${said}`;
  return said;
}

// -- math ---------------------------------------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
}

// The first two principal components, from the n x n Gram matrix of the centred vectors (n is small here).
function pca2(vectors) {
  const n = vectors.length, d = vectors[0].length;
  const mean = new Float64Array(d);
  for (const v of vectors) for (let j = 0; j < d; j++) mean[j] += v[j] / n;
  const centred = vectors.map((v) => Float64Array.from(v, (x, j) => x - mean[j]));
  const gram = centred.map((a) => centred.map((b) => a.reduce((s, x, j) => s + x * b[j], 0)));
  const axes = [];
  for (let k = 0; k < 2; k++) {
    let u = Float64Array.from({ length: n }, (_, i) => 1 + ((i * 7919 + k * 104729) % 13) / 13);
    let value = 0;
    for (let iter = 0; iter < 200; iter++) {
      const next = gram.map((row) => row.reduce((s, x, j) => s + x * u[j], 0));
      for (const [prev, lambda] of axes) {  // deflate: stay orthogonal to the axes found
        const proj = prev.reduce((s, x, j) => s + x * next[j], 0);
        for (let i = 0; i < n; i++) next[i] -= proj * prev[i];
      }
      const norm = Math.hypot(...next);
      if (norm < 1e-12) break;
      value = norm;
      u = next.map((x) => x / norm);
    }
    axes.push([u, value]);
  }
  return vectors.map((_, i) => axes.map(([u, value]) => u[i] * Math.sqrt(value)));
}

// -- rendering ----------------------------------------------------------------------------------------------

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function short(text, max = 28) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function showHealth(h) {
  $("status-provider").textContent = h.provider;
  $("status-model").textContent = h.model;
  const cache = $("status-cache");
  cache.textContent = `${h.cache}: ${h.cache_ok ? "answering" : "not answering (requests still work, uncached)"}`;
  cache.className = h.cache_ok ? "ok" : "degraded";
  $("status-auth").textContent = h.auth === "required" ? "required" : "not required (open)";
  $("key-row").hidden = h.auth !== "required";
  const select = $("model");
  select.replaceChildren(...h.models.map((id) => el("option", { value: id }, id)));
  select.value = h.model;
  onModelChange();
}

function onModelChange() {
  const h = state.health || {};
  if (h.provider === "routes") { // each model has its own routes, in order, each up or down
    const routes = (h.routes && h.routes[$("model").value]) || [];
    $("status-provider").textContent = routes.map((r) => `${r.name} (${r.state})`).join(" → ");
  }
  const details = h.model_details || [];
  const info = details.find((m) => m.id === $("model").value);
  const input = $("dimensions");
  input.disabled = !(info && info.flexible_dimensions);
  if (input.disabled) input.value = "";
  if (info && info.dimensions) {
    input.max = String(info.dimensions);
    input.placeholder = `native: ${info.dimensions}`;
  } else {
    input.removeAttribute("max");
    input.placeholder = "native";
  }
}

function showMessage(kind, text) {
  const box = $("message");
  box.hidden = !text;
  box.className = `message ${kind}`;
  box.textContent = text || "";
}

function colour(value) {
  // 0 (or below) is the lightest, 1 the darkest: one hue, so the order reads without a legend key.
  const t = Math.max(0, Math.min(1, value));
  return `hsl(210, ${60 + 20 * t}%, ${97 - 67 * t}%)`;
}

function renderHeatmap(texts, vectors) {
  const table = $("heatmap");
  const head = el("tr");
  head.append(el("th", { scope: "col" }, "text"));
  texts.forEach((t, j) => head.append(el("th", { scope: "col", title: t, "aria-label": `${j + 1}. ${t}` },
    `${j + 1}`)));
  const rows = texts.map((t, i) => {
    const row = el("tr");
    row.append(el("th", { scope: "row", title: t }, `${i + 1}. ${short(t)}`));
    texts.forEach((_, j) => {
      const value = cosine(vectors[i], vectors[j]);
      const cell = el("td", { title: `${short(texts[i], 40)} vs ${short(texts[j], 40)}: ${value.toFixed(4)}` },
        value.toFixed(2));
      cell.style.backgroundColor = colour(value); // CSSOM, not an inline style attribute: allowed by the CSP
      if (value > 0.55) cell.classList.add("dark");
      row.append(cell);
    });
    return row;
  });
  table.replaceChildren(el("thead"), el("tbody"));
  table.tHead.append(head);
  table.tBodies[0].append(...rows);
}

function renderMap(texts, vectors) {
  const map = $("map");
  map.replaceChildren();
  if (texts.length < 2) return;
  const points = pca2(vectors);
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 20 + ((x - x0) / ((x1 - x0) || 1)) * 230;
  const sy = (y) => 235 - ((y - y0) / ((y1 - y0) || 1)) * 210;
  const placed = points.map(([x, y], i) => ({ i, cx: sx(x), cy: sy(y), ly: sy(y) + 4 }));
  // Labels of nearby points are pushed apart vertically, so each stays readable.
  const byY = placed.slice().sort((a, b) => a.ly - b.ly);
  for (let k = 1; k < byY.length; k++) {
    for (let m = 0; m < k; m++) {
      if (Math.abs(byY[k].cx - byY[m].cx) < 140 && byY[k].ly - byY[m].ly < 14) byY[k].ly = byY[m].ly + 14;
    }
  }
  for (const p of placed) {
    const group = svg("g");
    group.append(svg("title", {}, texts[p.i]));
    group.append(svg("circle", { cx: p.cx.toFixed(1), cy: p.cy.toFixed(1), r: 5 }));
    group.append(svg("text", { x: (p.cx + 8).toFixed(1), y: p.ly.toFixed(1) }, `${p.i + 1}. ${short(texts[p.i], 20)}`));
    map.append(group);
  }
}

function renderSummary(result) {
  const words = (n, one, many) => `${n} ${n === 1 ? one : many}`;
  $("summary").textContent = `${result.latency.toFixed(0)} ms · ${words(result.hits, "hit", "hits")}, ` +
    `${words(result.misses, "miss", "misses")} · ${words(result.tokens, "token", "tokens")} billed · ${result.model}` +
    (result.route ? ` via ${result.route}` : "");
  if (result.cacheError) {
    showMessage("warning", `Cache degraded: the ${result.cacheError} cache did not answer, so these vectors came ` +
      "from the provider and may be paid for again.");
  }
}

// -- events -----------------------------------------------------------------------------------------------------

async function onEmbed(event) {
  event.preventDefault();
  showMessage("error", "");
  const raw = $("texts").value.replace(/\r/g, "");
  const texts = (raw.endsWith("\n") ? raw.slice(0, -1) : raw).split("\n");
  const dims = $("dimensions").disabled ? null : Number($("dimensions").value) || null;
  const button = $("embed");
  button.disabled = true;
  try {
    const result = await embed(texts, $("model").value, dims);
    Object.assign(state, { texts, vectors: result.vectors, model: $("model").value, dimensions: dims });
    $("results").hidden = false;
    renderSummary(result);
    renderHeatmap(texts, result.vectors);
    renderMap(texts, result.vectors);
    $("ranking").replaceChildren();
  } catch (err) {
    // The last results were for other texts: never leave them on screen beside this error as if they were its.
    $("results").hidden = true;
    Object.assign(state, { texts: [], vectors: [] });
    showMessage("error", err.message);
  } finally {
    button.disabled = false;
  }
}

async function onQuery(event) {
  event.preventDefault();
  const query = $("query").value;
  if (!state.vectors.length) return;
  const button = $("search");
  button.disabled = true;
  try {
    const { vectors: [q] } = await embed([query], state.model, state.dimensions);
    const ranked = state.texts.map((t, i) => [cosine(q, state.vectors[i]), t]).sort((a, b) => b[0] - a[0]);
    $("ranking").replaceChildren(...ranked.map(([score, text]) => {
      const item = el("li");
      item.append(el("span", { class: "score" }, score.toFixed(2)), document.createTextNode(text));
      return item;
    }));
  } catch (err) {
    $("ranking").replaceChildren(); // an earlier query's ranking is not this one's
    showMessage("error", err.message);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORE, key.value));
  $("model").addEventListener("change", onModelChange);
  $("embed-form").addEventListener("submit", onEmbed);
  $("query-form").addEventListener("submit", onQuery);
  loadHealth();
});
