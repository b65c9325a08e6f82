// The dashboard page: renders the orchestrator's snapshot (orchestrator/dashboard.py) and keeps
// it live with server-sent events, falling back to polling where a stream cannot be kept open.
// Every value from the server goes into the page as text (never as HTML): prompts are client input.
"use strict";

const STATE_URL = "/dashboard/api/state";
const EVENTS_URL = "/dashboard/api/events";
const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

const fmt = {
  seconds(s) {
    if (s === null || s === undefined) return "–";
    return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
  },
  share(x) { return x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`; },
  number(x, digits = 3) { return x === null || x === undefined ? "–" : x.toFixed(digits); },
  short(hotkey) { return hotkey ? `${hotkey.slice(0, 6)}…${hotkey.slice(-4)}` : "–"; },
  time(iso) { return iso ? new Date(iso).toLocaleTimeString() : "–"; },
};

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderTotals(snapshot) {
  const requests = snapshot.totals.requests;
  const audits = snapshot.totals.audits;
  const cards = [
    ["requests", Object.values(requests).reduce((a, b) => a + b, 0)],
    ["queued", requests.queued + requests.dispatched],
    ["running", requests.running],
    ["succeeded", requests.succeeded],
    ["failed", requests.failed],
    ["audits passed", audits.pass || 0],
    ["audits failed", audits.fail || 0],
    ["audits owed", snapshot.totals.audits_owed],
    ["miners healthy", snapshot.miners.filter((m) => m.status === "healthy").length],
  ];
  document.getElementById("totals").replaceChildren(
    ...cards.map(([label, value]) =>
      el("div", { class: "card", "data-total": label },
        el("div", { class: "value", text: String(value) }), el("div", { class: "label", text: label }))),
  );
}

function outcomes(miner) {
  const span = el("span");
  for (const [outcome, count] of Object.entries(miner.outcomes)) {
    span.append(el("span", { class: `outcome ${outcome}`, "data-outcome": outcome, text: `${outcome} ${count}` }));
  }
  if (!span.childElementCount) span.textContent = "none yet";
  return span;
}

function renderMiners(snapshot) {
  const rows = snapshot.miners.map((m) => {
    const status = el("span", { class: `pill ${m.status}`, text: m.status,
      title: m.penalized_until ? `score zeroed until ${new Date(m.penalized_until).toLocaleString()}` : `last probe ${fmt.time(m.last_probe_at)}` });
    const audits = el("span", {},
      el("span", { class: "outcome succeeded", text: `✓ ${m.audits.pass}` }),
      el("span", { class: "outcome failed", text: `✗ ${m.audits.fail}` }));
    return el("tr", { "data-hotkey": m.hotkey, "data-uid": String(m.uid) },
      el("td", { class: "num", text: String(m.uid) }),
      el("td", { class: "mono", title: m.hotkey, text: fmt.short(m.hotkey) }),
      el("td", {}, status),
      el("td", { class: "outcomes" }, outcomes(m)),
      el("td", { class: "num p50", text: fmt.seconds(m.latency.p50) }),
      el("td", { class: "num p95", text: fmt.seconds(m.latency.p95) }),
      el("td", { class: "audits" }, audits),
      el("td", { class: "num score", text: fmt.number(m.score) }),
      el("td", { class: "num weight", text: fmt.share(m.weight) }),
      el("td", { class: "num emission", text: fmt.number(m.emission, 4) }));
  });
  replaceRows(document.querySelector("#miners tbody"), rows);
  document.getElementById("miners-empty").hidden = rows.length > 0;
}

// One small SVG line chart per miner: p50 and p95 per time bucket, on a y-axis shared by all
// miners so that their heights compare. Empty buckets break the line instead of dropping to 0.
function latencyChart(series, maxY) {
  const W = 300, H = 120, left = 34, bottom = 16, top = 6;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const x = (i) => left + (i / Math.max(series.length - 1, 1)) * (W - left - 4);
  const y = (v) => top + (1 - v / maxY) * (H - top - bottom);
  chart.append(svg("line", { class: "axis", x1: left, y1: y(0), x2: W, y2: y(0) }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: y(0) }));
  const yLabel = svg("text", { class: "label", x: 2, y: top + 8 });
  yLabel.textContent = fmt.seconds(maxY);
  chart.append(yLabel);
  if (series.length) {
    const xLabel = svg("text", { class: "label", x: left, y: H - 2 });
    xLabel.textContent = fmt.time(series[0].t);
    const nowLabel = svg("text", { class: "label", x: W - 4, y: H - 2, "text-anchor": "end" });
    nowLabel.textContent = fmt.time(series[series.length - 1].t);
    chart.append(xLabel, nowLabel);
  }
  for (const key of ["p95", "p50"]) {
    let d = "";
    let pen = "M";
    series.forEach((point, i) => {
      if (point[key] === null) { pen = "M"; return; }
      d += `${pen}${x(i).toFixed(1)},${y(point[key]).toFixed(1)} `;
      pen = "L";
    });
    // A lone point would draw nothing: mark it with a dot.
    series.forEach((point, i) => {
      const prev = series[i - 1], next = series[i + 1];
      if (point[key] !== null && (!prev || prev[key] === null) && (!next || next[key] === null)) {
        chart.append(svg("circle", { class: key, cx: x(i), cy: y(point[key]), r: 2 }));
      }
    });
    if (d) chart.append(svg("path", { class: key, d }));
  }
  return chart;
}

function renderPlots(snapshot) {
  let maxY = 0;
  for (const m of snapshot.miners) for (const p of m.series) maxY = Math.max(maxY, p.p95 ?? 0, p.p50 ?? 0);
  maxY = maxY > 0 ? maxY * 1.1 : 1;
  const cards = snapshot.miners.map((m) => {
    const done = m.series.reduce((a, p) => a + p.n, 0);
    return el("div", { class: "plot", "data-hotkey": m.hotkey },
      el("div", { text: `uid ${m.uid} · ${done} succeeded` }), latencyChart(m.series, maxY));
  });
  document.getElementById("plots").replaceChildren(...cards);
}

function renderKinds(snapshot) {
  const rows = (snapshot.kinds || []).map((k) =>
    el("tr", { "data-kind": k.kind },
      el("td", { title: k.kind, text: k.label }),
      el("td", { class: "num jobs", text: String(k.jobs) }),
      el("td", { class: "num succeeded", text: String(k.succeeded) }),
      el("td", { class: "num failed", text: String(k.failed) }),
      el("td", { class: "num p50", text: fmt.seconds(k.latency.p50) }),
      el("td", { class: "num p95", text: fmt.seconds(k.latency.p95) })));
  replaceRows(document.querySelector("#kinds tbody"), rows);
  document.getElementById("kinds-empty").hidden = rows.length > 0;
}

function renderModels(snapshot) {
  const models = snapshot.models || [];
  const rows = models.map((m) =>
    el("tr", { "data-model": m.model },
      el("td", { text: m.default ? `${m.model} (default)` : m.model }),
      el("td", { class: "num miners", title: m.miners.map((uid) => `uid ${uid}`).join(", "),
        text: `${m.healthy_miners}/${m.miners.length}` }),
      el("td", { class: "num jobs", text: String(m.jobs) }),
      el("td", { class: "num succeeded", text: String(m.succeeded) }),
      el("td", { class: "num failed", text: String(m.failed) }),
      el("td", { class: "num success", text: fmt.share(m.success_rate) }),
      el("td", { class: "num p50", text: fmt.seconds(m.latency.p50) }),
      el("td", { class: "num p95", text: fmt.seconds(m.latency.p95) }),
      el("td", { class: "audits", text: `${m.audits.pass} pass · ${m.audits.fail} fail · ${m.audits.inconclusive} ?` })));
  replaceRows(document.querySelector("#models tbody"), rows);
  let maxY = 0;
  for (const m of models) for (const p of m.series) maxY = Math.max(maxY, p.p95 ?? 0, p.p50 ?? 0);
  maxY = maxY > 0 ? maxY * 1.1 : 1;
  const cards = models.map((m) => {
    const done = m.series.reduce((a, p) => a + p.n, 0);
    return el("div", { class: "plot", "data-model": m.model },
      el("div", { text: `${m.model} · ${done} succeeded` }), latencyChart(m.series, maxY));
  });
  document.getElementById("model-plots").replaceChildren(...cards);
}

function renderProfiles(snapshot) {
  const rows = snapshot.profiles.map((p) =>
    el("tr", { "data-profile": p.profile, "data-kind": p.kind },
      el("td", { text: p.profile }),
      el("td", { class: "mono", text: p.fingerprint || "(not run yet)" }),
      el("td", { title: p.kind, text: p.label || p.kind }),
      el("td", { class: "num jobs", text: String(p.jobs) }),
      el("td", { class: "num", text: String(p.succeeded) }),
      el("td", { class: "num", text: String(p.failed) }),
      el("td", { class: "num", text: fmt.seconds(p.latency.p50) }),
      el("td", { class: "num", text: fmt.seconds(p.latency.p95) })));
  replaceRows(document.querySelector("#profiles tbody"), rows);
}

function renderGallery(snapshot) {
  const gallery = document.getElementById("gallery");
  const items = snapshot.gallery || [];
  // Keep figures that are still shown, so their images are not fetched again on every update.
  const existing = new Map([...gallery.children].map((f) => [f.dataset.jobId, f]));
  const figures = items.map((item) => {
    const task = item.input_image
      ? el("span", { class: "task",
          text: `${item.label}: input${item.mask_image ? ", mask" : ""} → result` + (item.strength != null ? ` · strength ${item.strength}` : "") })
      : null;
    const caption = el("figcaption", {},
      el("span", { class: "prompt", title: item.prompt, text: item.prompt }),
      task,
      `seed ${item.seed} · ${item.width}×${item.height} · uid ${item.miner_uid}` + (item.loras ? ` · ${item.loras} LoRA` : ""),
      item.audit ? el("span", { class: `pill ${item.audit}`, text: ` audit ${item.audit}` }) : null);
    const kept = existing.get(item.job_id);
    if (kept) {
      // A new audit verdict changes the caption only; the image stays as loaded.
      if (kept.dataset.audit !== String(item.audit)) {
        kept.querySelector("figcaption").replaceWith(caption);
        kept.dataset.audit = String(item.audit);
      }
      return kept;
    }
    const result = el("img", { class: "result", src: item.image, alt: item.prompt, loading: "lazy" });
    if (!item.input_image) {
      return el("figure", { "data-job-id": item.job_id, "data-audit": String(item.audit) }, result, caption);
    }
    // Before and after: the client's input (and the mask of an inpaint) beside the miner's result.
    const pair = el("div", { class: "pair" },
      el("img", { class: "input", src: item.input_image, alt: "input image", title: "input", loading: "lazy" }),
      item.mask_image ? el("img", { class: "mask", src: item.mask_image, alt: "mask", title: "mask (white: repainted)", loading: "lazy" }) : null,
      result);
    return el("figure", { class: "edit", "data-job-id": item.job_id, "data-audit": String(item.audit), "data-kind": item.kind },
      pair, caption);
  });
  gallery.replaceChildren(...figures);
  const empty = document.getElementById("gallery-empty");
  empty.hidden = figures.length > 0;
  if (snapshot.gallery === null) empty.textContent = "The gallery is turned off on this orchestrator.";
}

function renderFailures(snapshot) {
  const cards = snapshot.audit_failures.map((f) => {
    const facts = el("dl");
    const add = (term, value) => { if (value !== null && value !== undefined && value !== "") facts.append(el("dt", { text: term }), el("dd", { text: String(value) })); };
    add("job", f.job_id);
    add("miner", `uid ${f.miner_uid} · ${f.miner_hotkey}`);
    add("when", new Date(f.created_at).toLocaleString());
    add("prompt", f.prompt);
    add("seed", f.seed);
    add("miner sha256", f.miner.sha256);
    add("miner fingerprint", f.miner.fingerprint);
    add("reference sha256", f.reference.sha256);
    add("reference fingerprint", f.reference.fingerprint);
    // The verdict's measurements (hashes and fingerprints are already listed above).
    for (const [name, value] of Object.entries(f.metrics || {})) {
      if (/sha256|fingerprint/.test(name) || typeof value === "object") continue;
      // Six significant digits: thresholds like 0.99999 must not print as 1.000.
      add(name, typeof value === "number" && !Number.isInteger(value) ? String(Number(value.toPrecision(6))) : value);
    }
    const images = el("div", { class: "images" });
    if (f.input_image) images.append(el("figure", {}, el("img", { src: f.input_image, alt: "input image" }), "input"));
    if (f.mask_image) images.append(el("figure", {}, el("img", { src: f.mask_image, alt: "mask" }), "mask"));
    if (f.miner_image) images.append(el("figure", {}, el("img", { src: f.miner_image, alt: "miner's result" }), "miner"));
    if (f.reference_image) images.append(el("figure", {}, el("img", { src: f.reference_image, alt: "reference re-run" }), "reference"));
    return el("article", { class: "failure", "data-audit-id": String(f.id), "data-hotkey": f.miner_hotkey },
      el("div", {}, el("div", { class: "reason", text: `${f.label || f.kind} audit failed: ${f.reason}` }), facts), images);
  });
  document.getElementById("audit-failures").replaceChildren(...cards);
  document.getElementById("audit-failures-empty").hidden = cards.length > 0;
}

function render(snapshot) {
  document.getElementById("block").textContent = snapshot.block ?? "–";
  document.getElementById("profile").textContent = snapshot.profile;
  document.getElementById("updated").textContent = fmt.time(snapshot.now);
  const chainError = document.getElementById("chain-error");
  chainError.hidden = !snapshot.chain_error;
  chainError.textContent = snapshot.chain_error ? `chain: ${snapshot.chain_error}` : "";
  renderTotals(snapshot);
  renderMiners(snapshot);
  renderPlots(snapshot);
  renderKinds(snapshot);
  renderModels(snapshot);
  renderProfiles(snapshot);
  renderGallery(snapshot);
  renderFailures(snapshot);
  document.body.dataset.updated = snapshot.now;
}

function setLive(state, text) {
  const live = document.getElementById("live");
  live.className = `pill ${state}`;
  live.textContent = text;
}

async function poll() {
  try {
    const response = await fetch(STATE_URL, { cache: "no-store" });
    if (!response.ok) {
      // A 401 says how to get the operator token's cookie again: show that, not just the code.
      const detail = await response.json().then((body) => body.detail, () => null);
      throw new Error(detail || `HTTP ${response.status}`);
    }
    render(await response.json());
    setLive("live", "live (polling)");
  } catch (err) {
    setLive("offline", `offline: ${err.message}`);
  }
  setTimeout(poll, POLL_MS);
}

function stream() {
  const source = new EventSource(EVENTS_URL);
  let failures = 0;
  source.addEventListener("snapshot", (event) => {
    failures = 0;
    render(JSON.parse(event.data));
    setLive("live", "live");
  });
  // The server ends each stream after a few seconds and the browser reconnects; only repeated
  // failures in a row mean the orchestrator is gone (or a proxy buffers streams): then poll.
  source.addEventListener("error", () => {
    failures += 1;
    if (failures >= 5) {
      source.close();
      poll();
    } else if (failures > 1) {
      setLive("waiting", "reconnecting…");
    }
  });
}

if (window.EventSource) stream();
else poll();
