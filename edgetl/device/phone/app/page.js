// The page over window.edgetl: camera, teaching, training, versions, sync with the Pi.
import { edgetl } from "./edgetl.js";

const $ = (id) => document.getElementById(id);
const pct = (v) => `${(100 * v).toFixed(1)}%`;
let stream = null;
let liveTimer = null;

function say(id, text, error = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

function showPrediction(p) {
  $("prediction-label").textContent = p.label ?? "unknown";
  $("prediction-meta").textContent = `${pct(p.score)} · ${p.mode} · v${p.version} · ${p.ms.toFixed(0)} ms`;
  $("bars").replaceChildren(...p.top.map((t) => {
    const li = document.createElement("li");
    const name = document.createElement("span"); name.textContent = t.label;
    const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = pct(t.score);
    const val = document.createElement("span"); val.textContent = pct(t.score);
    li.append(name, bar, val);
    return li;
  }));
}

async function refresh() {
  const info = await edgetl.info();
  const counts = info.samples, labels = [...new Set([...info.labels, ...Object.keys(counts)])];
  $("sample-total").textContent = `${Object.values(counts).reduce((a, b) => a + b, 0)} photos stored`;
  $("known-labels").replaceChildren(...labels.map((l) => Object.assign(document.createElement("option"), { value: l })));
  $("classes").replaceChildren(...labels.map((l) => {
    const li = document.createElement("li");
    const name = document.createElement("span"); name.textContent = l;
    const n = document.createElement("span"); n.className = "muted";
    const bundled = edgetl.meta.labels.includes(l), here = counts[l] ?? 0;
    n.textContent = [bundled ? "from the bundle" : null, here ? `${here} here` : null,
      info.labels.includes(l) ? null : "not in the head yet"].filter(Boolean).join(" · ");
    li.append(name, n);
    return li;
  }));
  const versions = await edgetl.history();
  $("versions").replaceChildren(...versions.reverse().map((v) => {
    const li = document.createElement("li");
    li.textContent = `v${v.version} · ${v.info.origin} · ${v.labels.length} classes${v.active ? " · active" : ""}`;
    if (!v.active) {
      const b = document.createElement("button");
      b.textContent = "use";
      b.onclick = async () => { await edgetl.rollback(v.version); await refresh(); };
      li.append(b);
    }
    return li;
  }));
  const st = info.self_test;
  $("status").textContent = `${info.backbone_file} · ${info.runtime.threads ? "threads" : "1 thread"} · self-test ${st.ok ? "passed" : "FAILED"} · v${info.head_version}`;
  $("status").title = st.message;
}

async function frame() { // the camera's current frame as a JPEG Blob
  const v = $("video"), c = new OffscreenCanvas(v.videoWidth, v.videoHeight);
  c.getContext("2d").drawImage(v, 0, 0);
  const blob = await c.convertToBlob({ type: "image/jpeg", quality: 0.92 });
  return new File([blob], `camera-${Date.now()}.jpg`, { type: "image/jpeg" });
}

async function predictLive() {
  if (!stream) return;
  try { showPrediction(await edgetl.predict(await frame(), { mode: $("mode").value })); } catch (e) { say("prediction-meta", e.message, true); }
  liveTimer = setTimeout(predictLive, 700);
}

async function add(blobs) {
  const label = $("label").value.trim();
  if (!label) { say("add-result", "type the class name first", true); return; }
  try {
    const r = await edgetl.add(label, blobs);
    const ok = r.filter((x) => "id" in x).length, bad = r.filter((x) => x.error);
    say("add-result", `${ok} stored as ${label}` + (bad.length ? `; ${bad.map((x) => x.error).join("; ")}` : "")
      + (r.some((x) => x.duplicate) ? "; duplicates skipped" : ""), bad.length > 0 && ok === 0);
  } catch (e) { say("add-result", e.message, true); }
  await refresh();
}

function wire() {
  $("camera-start").onclick = async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
      $("video").srcObject = stream;
      $("video").hidden = false;
      $("snap").disabled = false;
      $("camera-start").hidden = true;
      await $("video").play();
      predictLive();
    } catch (e) { say("prediction-meta", `camera: ${e.message}`, true); }
  };
  $("snap").onclick = async () => add([await frame()]);
  $("add-files").onchange = async (e) => { await add([...e.target.files]); e.target.value = ""; };
  $("predict-file").onchange = async (e) => {
    const f = e.target.files[0];
    if (f) try { showPrediction(await edgetl.predict(f, { mode: $("mode").value })); } catch (err) { say("prediction-meta", err.message, true); }
    e.target.value = "";
  };
  $("train").onclick = async () => {
    $("train").disabled = true;
    say("train-result", "training…");
    try {
      const r = await edgetl.train();
      say("train-result", `v${r.version}: ${r.labels.length} classes, ${r.seconds.toFixed(2)} s` + (r.activated ? "" : ` — ${r.candidate}`), !r.activated);
    } catch (e) { say("train-result", e.message, true); }
    $("train").disabled = false;
    await refresh();
  };
  $("sync").onclick = async () => {
    try {
      const r = await edgetl.sync({ token: $("token").value || null });
      say("sync-result", `sent ${r.sent.stored} new photos' features, received ${r.received}; the Pi's head is v${r.version} here`
        + (r.activated ? "" : " (kept inactive: it does not know every class learned here; train the Pi, then sync again)"));
    } catch (e) { say("sync-result", e.message, true); }
    await refresh();
  };
}

(async () => {
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("sw.js").catch(() => {});
  try {
    await edgetl.ready;
    $("title").textContent = `edgetl · ${edgetl.meta.name}`;
    $("app").hidden = false;
    wire();
    await refresh();
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = "not ready";
    $("fatal").textContent = e.message;
    $("fatal").hidden = false;
    document.body.dataset.ready = "error";
  }
})();
void liveTimer;
