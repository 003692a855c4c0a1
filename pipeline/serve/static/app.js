// The page of `mlc serve`: plain JS, no build step, no CDN. Talks to /api/labels, /api/model, /api/health and
// /api/predict (multipart: photo + caption) and draws every label's probability as a bar with its threshold.
"use strict";

const HISTORY = 8;  // predictions kept in the list (this tab only)
const $ = (id) => document.getElementById(id);
let labels = [];    // [{id, name, threshold}] in the model's column order
let chosenFile = null;
const history = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function getJSON(url, options) {
  const res = await fetch(url, options);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function pct(p) { return `${(100 * Math.max(0, Math.min(1, p))).toFixed(1)}%`; }

function drawCard(card) {
  $("model-name").textContent = card.model;
  const table = $("card");
  table.replaceChildren();
  for (const [k, v] of Object.entries(card)) {
    const shown = typeof v === "number" && !Number.isInteger(v) ? Number(v.toPrecision(4)) : v;
    table.append(el("tr", {}, el("th", { text: k.replaceAll("_", " ") }), el("td", { text: String(shown) })));
  }
}

function drawPrediction(pred, ms) {
  const chosen = new Set(pred.labels.map(String));
  $("chosen").textContent = pred.names.length ? pred.names.join(", ") : "(none)";
  $("took").textContent = `${ms} ms`;
  const rows = labels.map((l) => ({ ...l, p: pred.probabilities[String(l.id)], on: chosen.has(String(l.id)) }));
  rows.sort((a, b) => b.p - a.p);
  const bars = $("bars");
  bars.replaceChildren();
  for (const r of rows) {
    const track = el("div", { class: "track" }, el("div", { class: "fill", style: `width: ${pct(r.p)}` }));
    if (r.threshold !== null && r.threshold !== undefined) {
      track.append(el("div", { class: "tick", style: `left: ${pct(r.threshold)}`, title: `threshold ${r.threshold}` }));
    }
    const num = r.threshold === null || r.threshold === undefined ? r.p.toFixed(3)
      : `${r.p.toFixed(3)} / ${r.threshold.toFixed(2)}`;
    bars.append(el("div", { class: `bar ${r.on ? "on" : "off"}`, "data-label": r.name, "data-id": String(r.id),
                            "data-probability": String(r.p), "data-chosen": String(r.on) },
                   el("span", { class: "name", text: r.name, title: `label ${r.id}` }), track,
                   el("span", { class: "num", text: num })));
  }
}

function addHistory(file, caption, pred) {
  const url = URL.createObjectURL(file);
  history.unshift({ url, caption, names: pred.names });
  while (history.length > HISTORY) URL.revokeObjectURL(history.pop().url);
  $("history").replaceChildren(...history.map((h) => el("li", {},
    el("img", { src: h.url, alt: "" }),
    el("span", {}, el("b", { text: h.names.join(", ") || "(none)" }), el("br"), h.caption))));
}

function choose(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  chosenFile = file;
  showError("");
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").hidden = true;
}

async function predict(event) {
  event.preventDefault();
  if (!chosenFile) { showError("Choose or drop a photo first."); return; }
  const caption = $("caption").value;
  const form = new FormData();
  form.append("photo", chosenFile, chosenFile.name);
  form.append("caption", caption);
  $("go").disabled = true;
  showError("");
  const t0 = performance.now();
  try {
    const body = await getJSON("/api/predict", { method: "POST", body: form });
    const pred = body.predictions[0];
    drawPrediction(pred, Math.round(performance.now() - t0));
    addHistory(chosenFile, caption, pred);
    document.body.dataset.predictions = String(Number(document.body.dataset.predictions || 0) + 1);
    health();
  } catch (e) {
    showError(e.message);
  } finally {
    $("go").disabled = false;
  }
}

async function health() {
  try {
    const h = await getJSON("/api/health");
    $("health").textContent = `ready: ${h.requests} requests in ${h.batches} batches`;
    $("health").className = "ok";
  } catch (e) {
    $("health").textContent = `server unreachable (${e.message})`;
    $("health").className = "bad";
  }
}

async function start() {
  $("photo").addEventListener("change", (e) => choose(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  $("form").addEventListener("submit", predict);
  try {
    const [lab, card] = await Promise.all([getJSON("/api/labels"), getJSON("/api/model")]);
    labels = lab.labels;
    // the tick's key only where the rule reads thresholds (the expected-F1 rules choose a top-k per photo)
    $("tick-legend").hidden = !labels.some((l) => l.threshold !== null && l.threshold !== undefined);
    $("rule").textContent = `Decision rule: ${lab.decision_rule}`;
    drawCard(card);
    document.body.dataset.ready = "true";
  } catch (e) {
    showError(`cannot read the model: ${e.message}`);
  }
  await health();
  setInterval(health, 10000);
}

start();
