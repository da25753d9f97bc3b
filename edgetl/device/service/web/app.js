// edgetl device page: no build step, no CDN (the device may be offline).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = {
  token: null, info: null, samples: {}, pending: [], live: false, predicting: false,
  stream: null, job: null, thumbURLs: new Map(),
};

// ---- the API ------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  let resp;
  try {
    resp = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, "the device does not answer (" + e.message + ")");
  }
  if (resp.status === 401) { askToken("The token was not accepted."); throw new ApiError(401, "token needed"); }
  const type = resp.headers.get("content-type") || "";
  const body = type.includes("json") ? await resp.json() : await resp.blob();
  if (!resp.ok && !(body && body.files)) throw new ApiError(resp.status, (body && body.error) || resp.statusText);
  return body;
}

const jsonBody = (obj) => ({ body: JSON.stringify(obj), headers: { "Content-Type": "application/json" } });

// ---- token ----------------------------------------------------------------------------------------
function readToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem("edgetl-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // keep it out of the address bar
  }
  state.token = localStorage.getItem("edgetl-token");
}

function askToken(message) {
  $("#app").hidden = true;
  $("#token-box").hidden = false;
  const err = $("#token-error");
  err.hidden = !message || !state.token;
  err.textContent = message || "";
}

$("#token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.token = $("#token-input").value.trim();
  localStorage.setItem("edgetl-token", state.token);
  $("#token-box").hidden = true;
  await refresh();
});

// ---- info, classes, thumbnails ----------------------------------------------------------------------
function setStatus(text) { $("#status").textContent = text; }

async function refresh() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    if (e.status !== 401) setStatus(e.message);
    return;
  }
  $("#app").hidden = false;
  $("#token-box").hidden = true;
  const i = state.info;
  $("#title").textContent = "edgetl · " + (i.name || "device");
  setStatus(`head version ${i.head_version} · ${i.labels.length} classes · ${i.backbone_file} (${i.backend})`);
  const total = Object.values(i.samples).reduce((a, b) => a + b, 0);
  $("#sample-total").textContent = `${total} photo${total === 1 ? "" : "s"} stored`;
  await renderCards();
  await Promise.all([renderHistory(), renderMetrics()]);
  if (i.training && !state.job) followJob(i.training.id);
}

function classNames() {
  const i = state.info;
  const names = [...Object.keys(i.samples)];
  for (const l of i.labels) if (!names.includes(l)) names.push(l);
  for (const p of state.pending) if (!names.includes(p)) names.push(p);
  return names;
}

async function thumbURL(id) {
  if (state.thumbURLs.has(id)) return state.thumbURLs.get(id);
  try {
    const blob = await api(`/api/samples/${id}/thumb`);
    const url = URL.createObjectURL(blob);
    state.thumbURLs.set(id, url);
    return url;
  } catch (e) {
    return null;
  }
}

async function renderCards() {
  const list = await api("/api/samples?limit=1000");
  const byLabel = {};
  for (const s of list.samples) (byLabel[s.label] = byLabel[s.label] || []).push(s);
  const cards = $("#cards");
  const keep = new Set();
  for (const name of classNames()) {
    keep.add(name);
    let card = [...cards.children].find((c) => c.dataset.label === name);
    if (!card) {
      card = $("#card-template").content.firstElementChild.cloneNode(true);
      card.dataset.label = name;
      $(".card-name", card).textContent = name;
      wireCard(card);
      cards.appendChild(card);
    }
    const n = state.info.samples[name] || 0;
    const inHead = state.info.labels.includes(name);
    // A class of the bundle with no photo stored here: it was learned on the workstation.
    $(".count", card).textContent = n === 0 && inHead ? "from the bundle · no photos stored here"
      : `${n} photo${n === 1 ? "" : "s"}` + (inHead ? "" : " · not trained yet");
    $(".delete", card).title = n === 0 && inHead ? "stop predicting this class (a rollback brings it back)"
      : "delete this class and its photos";
    const thumbs = $(".thumbs", card);
    const shown = (byLabel[name] || []).slice(0, 12);
    const ids = shown.map((s) => String(s.id)).join(",");
    if (thumbs.dataset.ids !== ids) {
      thumbs.dataset.ids = ids;
      thumbs.replaceChildren();
      for (const s of shown) {
        const img = document.createElement("img");
        img.alt = s.source || `sample ${s.id}`;
        img.title = `${s.source || ""} (sample ${s.id}); tap to delete`;
        img.dataset.id = s.id;
        img.addEventListener("click", () => deleteSample(s.id, name));
        thumbs.appendChild(img);
        thumbURL(s.id).then((u) => { if (u) img.src = u; });
      }
    }
  }
  for (const c of [...cards.children]) if (!keep.has(c.dataset.label)) c.remove();
}

function wireCard(card) {
  const name = () => card.dataset.label;
  $(".file-input", card).addEventListener("change", async (ev) => {
    const files = [...ev.target.files];
    ev.target.value = "";
    if (files.length) await upload(card, name(), files);
  });
  const hold = $(".hold", card);
  let timer = null, shots = [], holding = false;
  const stop = async () => {
    holding = false;
    if (timer === null) return;
    clearInterval(timer);
    timer = null;
    card.classList.remove("recording");
    hold.textContent = "Hold to record";
    const batch = shots;
    shots = [];
    if (batch.length) await upload(card, name(), batch);
  };
  hold.addEventListener("pointerdown", async (ev) => {
    ev.preventDefault();
    holding = true;
    if (!state.stream) {
      if (!(await startCamera())) { $(".file-input", card).click(); return; }
      if (!holding) { note(card, "camera on: hold the button to record"); return; }  // let go while it started
    }
    if (timer !== null) return;
    card.classList.add("recording");
    const grab = async () => {
      const blob = await frameBlob();
      if (blob) {
        shots.push(new File([blob], `camera-${Date.now()}-${shots.length}.jpg`, { type: "image/jpeg" }));
        hold.textContent = `Recording… ${shots.length}`;
      }
      if (shots.length >= (state.info.limits.max_files || 64)) stop();
    };
    grab();
    timer = setInterval(grab, 250);
  });
  for (const ev of ["pointerup", "pointerleave", "pointercancel"]) hold.addEventListener(ev, stop);
  hold.addEventListener("contextmenu", (ev) => ev.preventDefault());
  $(".rename", card).addEventListener("click", async () => {
    const to = prompt(`New name for "${name()}"`, name());
    if (!to || to.trim() === name()) return;
    if (!state.info.samples[name()] && !state.info.labels.includes(name())) {  // only on this page so far
      state.pending = state.pending.map((p) => (p === name() ? to.trim() : p));
      card.remove();
      return renderCards();
    }
    try {
      await api(`/api/labels/${encodeURIComponent(name())}`, { method: "PATCH", ...jsonBody({ name: to.trim() }) });
      card.remove();
      await refresh();
    } catch (e) { note(card, e.message, true); }
  });
  $(".delete", card).addEventListener("click", async () => {
    const n = state.info.samples[name()] || 0;
    if (!confirm(`Delete the class "${name()}" and its ${n} photo(s)? A rollback brings the head back, not the photos.`)) return;
    if (!n && !state.info.labels.includes(name())) {
      state.pending = state.pending.filter((p) => p !== name());
      card.remove();
      return;
    }
    try {
      await api(`/api/labels/${encodeURIComponent(name())}`, { method: "DELETE" });
      state.pending = state.pending.filter((p) => p !== name());
      card.remove();
      await refresh();
    } catch (e) { note(card, e.message, true); }
  });
}

function note(card, text, bad = false) {
  const p = $(".card-note", card);
  p.textContent = text;
  p.classList.toggle("error", bad);
}

async function upload(card, label, files) {
  const max = state.info.limits.max_files || 64;
  let stored = 0, dup = 0;
  const errors = [];
  for (let i = 0; i < files.length; i += max) {
    const form = new FormData();
    form.append("label", label);
    for (const f of files.slice(i, i + max)) form.append("files", f, f.name);
    note(card, `uploading ${Math.min(files.length, i + max)} of ${files.length}…`);
    try {
      const r = await api("/api/samples", { method: "POST", body: form });
      stored += r.stored;
      for (const f of r.files) {
        if (f.error) errors.push(`${f.file}: ${f.error}`);
        if (f.duplicate) dup += 1;
      }
    } catch (e) {
      errors.push(e.message);
      break;
    }
  }
  state.pending = state.pending.filter((p) => p !== label);
  note(card, `stored ${stored}` + (dup ? `, ${dup} already stored` : "") + (errors.length ? ` · ${errors.join("; ")}` : ""),
       errors.length > 0);
  await refresh();
}

async function deleteSample(id, label) {
  if (!confirm(`Delete this photo of "${label}"?`)) return;
  try {
    await api(`/api/samples/${id}`, { method: "DELETE" });
  } catch (e) { setStatus(e.message); }
  await refresh();
}

$("#new-class-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("#new-class-name").value.trim();
  if (!name) return;
  const existing = classNames().find((n) => n.toLowerCase() === name.toLowerCase());
  $("#new-class-name").value = "";
  if (!existing) state.pending.push(name);
  await renderCards();
  const card = [...$("#cards").children].find((c) => c.dataset.label === (existing || name));
  if (card) {
    note(card, existing ? "this class exists already" : "add photos: hold the button with the camera on it, or pick photos");
    card.scrollIntoView({ block: "nearest" });
  }
});

// ---- camera and live predictions --------------------------------------------------------------------
async function startCamera() {
  if (state.stream) return true;
  const noteEl = $("#camera-note");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    noteEl.hidden = false;
    noteEl.textContent = window.isSecureContext
      ? "This browser gives no camera access; use Photos."
      : "Live camera needs HTTPS (serve with --certfile/--keyfile); Photos opens the phone's camera instead.";
    return false;
  }
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
    });
  } catch (e) {
    noteEl.hidden = false;
    noteEl.textContent = "No camera: " + e.message;
    return false;
  }
  const video = $("#video");
  video.srcObject = state.stream;
  await video.play().catch(() => {});
  $("#camera-start").hidden = true;
  noteEl.hidden = true;
  return true;
}

async function frameBlob() {
  const video = $("#video");
  if (!video.videoWidth) return null;
  const scale = Math.min(1, 448 / Math.max(video.videoWidth, video.videoHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
}

function showPrediction(r) {
  $("#prediction-label").textContent = r.unknown
    ? `unknown (best guess ${r.top[0].label} ${(100 * r.score).toFixed(0)} %)`
    : `${r.label} ${(100 * r.score).toFixed(0)} %`;
  $("#prediction-meta").textContent = `${r.file} · version ${r.version} · ${r.mode} · ${r.ms.toFixed(0)} ms`;
  $("#prediction-meta").title = r.mode_reason || "";
  const bars = $("#bars");
  bars.replaceChildren();
  for (const t of r.top) {
    const li = document.createElement("li");
    li.innerHTML = '<span class="fill"></span><span class="text"><b></b><span></span></span>';
    li.querySelector(".fill").style.width = `${(100 * t.score).toFixed(1)}%`;
    li.querySelector("b").textContent = t.label;
    li.querySelector(".text span").textContent = `${(100 * t.score).toFixed(1)} %`;
    bars.appendChild(li);
  }
}

async function predictBlob(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  const r = await api(`/api/predict?mode=${$("#mode").value}&top=3`, { method: "POST", body: form });
  showPrediction(r);
  return r;
}

async function liveLoop() {
  while (state.live) {
    const blob = await frameBlob();
    if (blob) {
      try { await predictBlob(blob, "frame.jpg"); } catch (e) { $("#prediction-meta").textContent = e.message; }
    }
    await new Promise((r) => setTimeout(r, 300));
  }
}

$("#camera-start").addEventListener("click", startCamera);
$("#live-toggle").addEventListener("change", async (ev) => {
  state.live = ev.target.checked;
  if (state.live) {
    if (!(await startCamera())) { ev.target.checked = state.live = false; return; }
    liveLoop();
  }
});
$("#predict-file").addEventListener("change", async (ev) => {
  const f = ev.target.files[0];
  ev.target.value = "";
  if (!f) return;
  try { await predictBlob(f, f.name); } catch (e) { $("#prediction-label").textContent = e.message; }
});

// ---- training ----------------------------------------------------------------------------------------
$("#train").addEventListener("click", async () => {
  try {
    const job = await api("/api/train", { method: "POST" });
    followJob(job.id);
  } catch (e) {
    $("#job-state").textContent = e.message;
  }
});

async function followJob(id) {
  state.job = id;
  $("#train").disabled = true;
  try {
    for (;;) {
      const j = await api(`/api/jobs/${id}`);
      $("#progress").value = j.progress;
      if (j.state === "done") {
        const r = j.result;
        const held = r.heldout && r.heldout.available
          ? ` · ${rightOn(r.heldout.accuracy, r.heldout.samples, "held-back photos")}` : "";
        $("#job-state").textContent = r.activated === false
          ? `version ${r.version} kept but not used: ${r.candidate} (History: Use activates it)`
          : `done: version ${r.version}, ${r.labels.length} classes, ${r.num_samples} samples, ` +
            `${r.seconds.toFixed(1)} s${held}`;
        break;
      }
      if (j.state === "failed") { $("#job-state").textContent = "failed: " + j.error; break; }
      $("#job-state").textContent = `${j.state}… ${(100 * j.progress).toFixed(0)} %`;
      await new Promise((r) => setTimeout(r, 400));
    }
  } catch (e) {
    $("#job-state").textContent = e.message;
  } finally {
    state.job = null;
    $("#train").disabled = false;
    await refresh();
  }
}

// ---- history and metrics ------------------------------------------------------------------------------
async function renderHistory() {
  const h = await api("/api/history");
  const ol = $("#history");
  ol.replaceChildren();
  for (const v of [...h.versions].reverse()) {
    const li = document.createElement("li");
    li.value = v.version;
    li.classList.toggle("active", v.active);
    const held = v.info.heldout && v.info.heldout.available ? `, ${(100 * v.info.heldout.accuracy).toFixed(0)} % held-back` : "";
    const when = new Date(v.created * 1000).toLocaleString();
    li.textContent = `${v.info.origin}: ${v.labels.length} classes${held} · ${when}`;
    if (v.active) {
      li.append(" (active)");
    } else {
      const b = document.createElement("button");
      b.textContent = "Use";
      b.className = "rollback";
      b.addEventListener("click", async () => {
        try {
          await api("/api/rollback", { method: "POST", ...jsonBody({ version: v.version }) });
        } catch (e) { setStatus(e.message); }
        await refresh();
      });
      li.appendChild(b);
    }
    ol.appendChild(li);
  }
}

/** 95 % Wilson score interval of an accuracy measured on n photos (edgetl.metrics.wilson_interval). */
function wilson(acc, n, z = 1.96) {
  if (!n) return [0, 1];
  const centre = (acc + (z * z) / (2 * n)) / (1 + (z * z) / n);
  const half = (z * Math.sqrt((acc * (1 - acc)) / n + (z * z) / (4 * n * n))) / (1 + (z * z) / n);
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

/** "75 % right on 12 photos (too few to say much: 47-91 %)": an accuracy with how sure it is. */
function rightOn(acc, n, what) {
  const [lo, hi] = wilson(acc, n).map((v) => (100 * v).toFixed(0));
  const range = n < 30 ? `too few to say much: somewhere in ${lo}-${hi} %` : `95 % interval ${lo}-${hi} %`;
  return `${(100 * acc).toFixed(0)} % right on ${n} ${what} (${range})`;
}

async function renderMetrics() {
  const m = await api("/api/metrics");
  const box = $("#confusion-box"), mistakes = $("#mistakes");
  box.replaceChildren();
  mistakes.replaceChildren();
  if (!m.available) { $("#metrics-summary").textContent = m.reason; return; }
  $("#metrics-summary").textContent =
    `version ${m.version}: ${rightOn(m.accuracy, m.samples, "stored photos it did not train on")} ` +
    "(rows: true class, columns: predicted)";
  const used = m.labels.map((_, i) => m.confusion[i].some((v) => v) || m.confusion.some((row) => row[i]));
  const idx = m.labels.map((_, i) => i).filter((i) => used[i]);
  const table = document.createElement("table");
  table.className = "confusion";
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  for (const j of idx) { const th = document.createElement("th"); th.textContent = m.labels[j]; head.appendChild(th); }
  for (const i of idx) {
    const row = table.insertRow();
    const th = document.createElement("th");
    th.textContent = m.labels[i];
    row.appendChild(th);
    for (const j of idx) {
      const td = row.insertCell();
      const v = m.confusion[i][j];
      td.textContent = v;
      if (v) td.className = i === j ? "diag" : "off";
    }
  }
  box.appendChild(table);
  for (const w of m.misclassified.slice(0, 24)) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `sample ${w.id}`;
    fig.appendChild(img);
    const cap = document.createElement("figcaption");
    cap.textContent = `${w.label} → ${w.predicted}`;
    fig.appendChild(cap);
    mistakes.appendChild(fig);
    thumbURL(w.id).then((u) => { if (u) img.src = u; });
  }
}

window.addEventListener("hashchange", () => { if (location.hash.includes("token=")) { readToken(); refresh(); } });
readToken();
refresh();
