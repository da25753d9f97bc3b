// window.edgetl: the phone as a device. The bundle's TFLite backbone runs in LiteRT.js
// (WebAssembly + XNNPACK, the kernels LiteRT runs on the Pi); photos become features with the
// preprocessing of edgetl/preprocess.py; features, thumbnails and head versions live in
// IndexedDB; the head is retrained in the page with the recipe of `edgetl-device train`
// (learner.js). Nothing is fetched from outside the page's own origin.
import { loadAndCompile, loadLiteRt, Tensor } from "./vendor/litert.js";
import * as L from "./learner.js";
import { normalize, resizeRGB } from "./preprocess.js";

const ROOT = new URL(".", import.meta.url);
const MAX_PIXELS = 40_000_000;
const MODES = ["auto", "head", "ncm"];

export class EdgetlError extends Error {}

/** A photo (Blob/File) to upright RGB pixels: EXIF orientation honoured, no colour management
 * (as Pillow), transparency composited onto white. */
export async function decode(blob, name = "photo") {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none",
      premultiplyAlpha: "none" });
  } catch (e) {
    throw new EdgetlError(`${name}: not a recognised image (${e.message || e}); expected a JPEG, PNG, BMP, GIF or WebP photo`);
  }
  const { width: w, height: h } = bitmap;
  if (w * h > MAX_PIXELS) {
    bitmap.close();
    throw new EdgetlError(`${name}: ${w}x${h} pixels (${(w * h / 1e6).toFixed(1)} MP) is over the ${MAX_PIXELS / 1e6} MP limit; scale it down`);
  }
  const canvas = new OffscreenCanvas(w, h), ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, w, h).data, rgb = new Uint8Array(w * h * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    const a = rgba[i + 3];
    if (a === 255) { rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2]; }
    else for (let c = 0; c < 3; c++) rgb[j + c] = Math.round((rgba[i + c] * a + 255 * (255 - a)) / 255);
  }
  return { rgb, w, h };
}

async function thumbnail(pixels, size) { // a small JPEG of what the model saw (112 px, as the Pi keeps)
  const t = 112, canvas = new OffscreenCanvas(size, size), ctx = canvas.getContext("2d");
  const img = ctx.createImageData(size, size);
  for (let i = 0, j = 0; j < pixels.length; i += 4, j += 3) {
    img.data[i] = pixels[j]; img.data[i + 1] = pixels[j + 1]; img.data[i + 2] = pixels[j + 2]; img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  const small = new OffscreenCanvas(t, t);
  small.getContext("2d").drawImage(canvas, 0, 0, t, t);
  return small.convertToBlob({ type: "image/jpeg", quality: 0.8 });
}

async function sha256Hex(buf) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

const b64 = {
  encode(typed) { let s = ""; const u = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength); for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode(...u.subarray(i, i + 0x8000)); return btoa(s); },
  floats(text) { const s = atob(text), u = new Uint8Array(s.length); for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i); return new Float32Array(u.buffer); },
};

// -- IndexedDB: samples, head versions, meta -----------------------------------------------------------
function request(r) { return new Promise((ok, fail) => { r.onsuccess = () => ok(r.result); r.onerror = () => fail(r.error); }); }

class Store {
  static async open(name) {
    const r = indexedDB.open(name, 1);
    r.onupgradeneeded = () => {
      const db = r.result;
      const s = db.createObjectStore("samples", { keyPath: "id", autoIncrement: true });
      s.createIndex("digest", "digest", { unique: false });
      db.createObjectStore("heads", { keyPath: "version" });
      db.createObjectStore("meta");
    };
    const st = new Store();
    st.db = await request(r);
    return st;
  }

  async tx(stores, mode, fn) { // one transaction: all of it or nothing
    const t = this.db.transaction(stores, mode);
    const done = new Promise((ok, fail) => {
      t.oncomplete = () => ok();
      t.onabort = () => fail(t.error);
      t.onerror = () => fail(t.error);
    });
    let out;
    try { out = await fn(t); } catch (e) { try { t.abort(); } catch { /* already finished */ } throw e; }
    try { await done; } catch (e) {
      if (e && e.name === "QuotaExceededError") {
        throw new EdgetlError("the phone's storage for this page is full: nothing of this change was written; delete some photos or classes, or free space on the phone");
      }
      throw e;
    }
    return out;
  }

  all(name) { return this.tx([name], "readonly", (t) => request(t.objectStore(name).getAll())); }
  get(name, key) { return this.tx([name], "readonly", (t) => request(t.objectStore(name).get(key))); }
  put(name, value, key) { return this.tx([name], "readwrite", (t) => request(t.objectStore(name).put(value, key))); }
}

// -- the device ---------------------------------------------------------------------------------------
class Device {
  constructor() {
    this.ready = this._start();
    this.refCache = new Map();
  }

  async _fetch(name, kind = "arrayBuffer") {
    const r = await fetch(new URL(name, ROOT));
    if (!r.ok) throw new EdgetlError(`cannot load ${name} (${r.status}); reload the page while online once`);
    return r[kind]();
  }

  async _start() {
    const meta = await this._fetch("model/meta.json", "json");
    this.meta = meta;
    const f = meta.files, d = meta.feature_dim;
    const head = new Float32Array(await this._fetch("model/head.f32"));
    let o = 0;
    this.bundleLayers = f["head.f32"].layers.map(([din, c]) => {
      const W = head.slice(o, o + din * c); o += din * c;
      const b = head.slice(o, o + c); o += c;
      return { W, b };
    });
    if (f["replay.f16"]) {
      this.replayX = L.halvesToFloats(new Uint16Array(await this._fetch("model/replay.f16")));
      this.replayY = new Uint16Array(await this._fetch("model/replay_labels.u16"));
      this.basis = new Float32Array(await this._fetch("model/basis.f32"));
      this.basisMean = new Float32Array(await this._fetch("model/basis_mean.f32"));
      this.replayCoordsAll = new Float32Array(await this._fetch("model/replay_coords.f32"));
    } else {
      this.replayX = new Float32Array(0); this.replayY = new Uint16Array(0);
    }
    this._coords = new Map();
    const threads = self.crossOriginIsolated === true;
    this.runtime = { accelerator: "wasm", threads };
    await loadLiteRt(new URL("vendor/wasm/", ROOT).href, { threads });
    this.model = await loadAndCompile(new URL("model/backbone.tflite", ROOT).href, { accelerator: "wasm" });
    this.store = await Store.open(`edgetl:${meta.bundle_sha256}:${meta.backbone_sha256}`);
    if (!(await this.store.get("heads", 1))) {
      await this.store.tx(["heads", "meta"], "readwrite", async (t) => {
        t.objectStore("heads").put({ version: 1, labels: [...meta.labels], layers: this.bundleLayers,
          info: { origin: "bundle", note: "the workstation head from the bundle" }, created: Date.now() });
        t.objectStore("meta").put(1, "active");
      });
    }
    const refs = await this.store.get("meta", "references");
    if (refs) for (const [k, v] of refs) this.refCache.set(k, v);
    const version = (await this._fetch("files.json", "json")).version;
    const cached = await this.store.get("meta", `self_test:${version}:${navigator.userAgent}`);
    this.selfTestResult = cached || await this.selfTest();
    if (!cached) await this.store.put("meta", this.selfTestResult, `self_test:${version}:${navigator.userAgent}`);
    if (!this.selfTestResult.ok) throw new EdgetlError(this.selfTestResult.message);
    return this;
  }

  // what the learner needs of the bundle
  get bundle() {
    const self = this, d = this.meta.feature_dim;
    return {
      labels: this.meta.labels, featureDim: d, replayX: this.replayX, replayY: this.replayY, digest: this.meta.bundle_sha256,
      centre: this.centre(),
      subspace(dim) { return new L.Subspace(self.basisMean, self.basis.subarray(0, Math.min(dim, self.basis.length / d) * d), d); },
      replayCoords(dim) { // the shipped coordinates' first `dim` columns
        if (!self._coords.has(dim)) {
          const n = self.replayY.length, all = self.replayCoordsAll, k = all.length / Math.max(n, 1), kd = Math.min(dim, k);
          const out = new Float32Array(n * kd);
          for (let i = 0; i < n; i++) out.set(all.subarray(i * k, i * k + kd), i * kd);
          self._coords.set(dim, out);
        }
        return self._coords.get(dim);
      },
    };
  }

  centre() {
    const d = this.meta.feature_dim, n = this.replayY.length;
    if (!n) return null;
    if (!this._centre) {
      const c = new Float64Array(d);
      for (let i = 0; i < n; i++) for (let t = 0; t < d; t++) c[t] += this.replayX[i * d + t];
      this._centre = Float32Array.from(c, (v) => v / n);
    }
    return this._centre;
  }

  async features(pixels) {
    const spec = this.meta.preprocessing, s = spec.size;
    const input = new Tensor(normalize(pixels, spec), [1, s, s, 3]);
    try {
      const out = await this.model.run(input);
      const f = Float32Array.from(out[0].toTypedArray());
      out.forEach((t) => t.delete());
      return f;
    } finally {
      input.delete();
    }
  }

  async pixels(blob, name, minSide = 0) {
    const { rgb, w, h } = await decode(blob, name);
    if (Math.min(w, h) < minSide) {
      throw new EdgetlError(`${name}: ${w}x${h} pixels is too small to learn from; a photo to train on needs at least ${minSide} pixels on each side`);
    }
    return resizeRGB(rgb, w, h, this.meta.preprocessing.size);
  }

  /** The bundle's references through this browser's decoder and backbone, against the float
   * model's features: the self-test the Python device runs on each new CPU. */
  async selfTest() {
    const st = this.meta.self_test;
    if (!st) return { ok: true, message: "this bundle carries no self-test references" };
    const d = this.meta.feature_dim, jpeg = await this._fetch("model/refs.jpg");
    const ref = new Float32Array(await this._fetch("model/ref_features.f32"));
    const offsets = this.meta.files["refs.jpg"].offsets, n = offsets.length - 1;
    const feats = new Float32Array(n * d);
    let identical = 0;
    for (let i = 0; i < n; i++) {
      const px = await this.pixels(new Blob([jpeg.slice(offsets[i], offsets[i + 1])], { type: "image/jpeg" }), `reference ${i}`);
      if (st.pixels_sha256 && (await sha256Hex(px)) === st.pixels_sha256[i]) identical++;
      feats.set(await this.features(px), i * d);
    }
    let cosSum = 0, cosMin = 1;
    for (let i = 0; i < n; i++) {
      let ab = 0, aa = 0, bb = 0;
      for (let t = 0; t < d; t++) { const a = feats[i * d + t], b = ref[i * d + t]; ab += a * b; aa += a * a; bb += b * b; }
      const c = ab / Math.max(Math.sqrt(aa * bb), 1e-12);
      cosSum += c; cosMin = Math.min(cosMin, c);
    }
    const C = this.meta.labels.length;
    const mine = L.argmaxRows(L.headPredict(feats, n, this.bundleLayers), n, C);
    const theirs = L.argmaxRows(L.headPredict(ref, n, this.bundleLayers), n, C);
    const agreement = mine.reduce((a, v, i) => a + (v === theirs[i] ? 1 : 0), 0) / n;
    const r = { photos: n, cosine_mean: cosSum / n, cosine_min: cosMin, agreement, pixels_identical: identical === n,
      expected: { min_cosine_mean: st.min_cosine_mean, min_agreement: st.min_agreement }, file: this.meta.backbone_file,
      runtime: `LiteRT.js (${this.runtime.accelerator}${this.runtime.threads ? ", threads" : ""})`, checked: Date.now() };
    const problems = [];
    if (r.cosine_mean < st.min_cosine_mean) problems.push(`mean cosine to the float model ${r.cosine_mean.toFixed(4)}, expected >= ${st.min_cosine_mean.toFixed(4)}`);
    if (r.agreement < st.min_agreement) problems.push(`top-1 agreement ${r.agreement.toFixed(3)}, expected >= ${st.min_agreement.toFixed(3)}`);
    r.ok = !problems.length;
    r.message = r.ok
      ? `${r.file} passes its self-test here: cosine ${r.cosine_mean.toFixed(4)} (>= ${st.min_cosine_mean}), agreement ${r.agreement.toFixed(3)} (>= ${st.min_agreement}) on ${n} reference photos`
      : `${r.file} does not compute in this browser what the export verified: ${problems.join("; ")}, on ${n} reference photos; this page refuses to learn with it`;
    return r;
  }

  // -- the public API -----------------------------------------------------------------------------
  async info() {
    await this.ready;
    const head = await this.head();
    return { name: this.meta.name, bundle_sha256: this.meta.bundle_sha256, backbone_file: this.meta.backbone_file,
      precision: this.meta.precision, runtime: this.runtime, input_size: this.meta.preprocessing.size,
      feature_dim: this.meta.feature_dim, head_version: head.version, labels: head.labels,
      samples: await this.counts(), replay_features: this.replayY.length, self_test: this.selfTestResult };
  }

  async head(version) {
    const v = version ?? await this.store.get("meta", "active");
    const h = await this.store.get("heads", v);
    if (!h) throw new EdgetlError(`no head version ${v}`);
    return h;
  }

  async samples() { return this.store.all("samples"); }

  async counts() {
    const out = {};
    for (const s of await this.samples()) out[s.label] = (out[s.label] ?? 0) + 1;
    return out;
  }

  /** Photos of `label` (Blobs or Files): their features and thumbnails go into IndexedDB in one
   * transaction. One result per photo: {file, id} | {file, duplicate: true} | {file, error}. */
  async add(label, blobs) {
    await this.ready;
    label = String(label ?? "").trim();
    if (!label || label.length > 100) throw new EdgetlError(`a class name needs 1 to 100 characters; received ${JSON.stringify(label)}`);
    const head = await this.head();
    const known = [...new Set([...head.labels, ...Object.keys(await this.counts())])];
    const similar = known.find((k) => k !== label && k.toLowerCase() === label.toLowerCase());
    if (similar) throw new EdgetlError(`label ${JSON.stringify(label)} differs from the existing class ${JSON.stringify(similar)} only in case; use ${JSON.stringify(similar)}`);
    const rows = [];
    for (const [i, blob] of [...blobs].entries()) {
      const name = blob.name || `photo-${i + 1}`;
      try {
        const bytes = await blob.arrayBuffer();
        const px = await this.pixels(blob, name, this.meta.min_training_side ?? 0);
        rows.push({ name, digest: await sha256Hex(bytes), feature: await this.features(px), thumb: await thumbnail(px, this.meta.preprocessing.size) });
      } catch (e) {
        rows.push({ name, error: e instanceof EdgetlError ? e.message : `${name}: ${e.message || e}` });
      }
    }
    const stored = await this.samples();
    const have = new Set(stored.filter((s) => s.label === label).map((s) => s.digest));
    return this.store.tx(["samples"], "readwrite", async (t) => {
      const out = [];
      for (const r of rows) {
        if (r.error) { out.push({ file: r.name, error: r.error }); continue; }
        if (have.has(r.digest)) { out.push({ file: r.name, duplicate: true }); continue; }
        have.add(r.digest);
        const id = await request(t.objectStore("samples").add({ label, feature: r.feature, digest: r.digest, source: r.name, thumb: r.thumb, added: Date.now() }));
        out.push({ file: r.name, id });
      }
      return out;
    });
  }

  async removeSample(id) {
    await this.store.tx(["samples"], "readwrite", (t) => request(t.objectStore("samples").delete(id)));
  }

  async train({ force = false, ...cfg } = {}) {
    await this.ready;
    const current = await this.head();
    const samples = (await this.samples()).sort((a, b) => a.id - b.id);
    const r = L.retrain(this.bundle, samples, current, this.refCache, cfg, force);
    const versions = (await this.store.all("heads")).map((h) => h.version);
    const version = Math.max(...versions) + 1;
    await this.store.tx(["heads", "meta"], "readwrite", async (t) => {
      t.objectStore("heads").put({ version, labels: r.labels, layers: r.layers, info: r.info, created: Date.now() });
      if (r.activated) t.objectStore("meta").put(version, "active");
      t.objectStore("meta").put([...this.refCache], "references");
    });
    return { version, labels: r.labels, activated: r.activated, ...r.info };
  }

  async classMeans(head) {
    const d = this.meta.feature_dim, samples = await this.samples();
    const labels = [...head.labels, ...[...new Set(samples.map((s) => s.label))].filter((l) => !head.labels.includes(l))];
    const names = L.bundleNames(this.meta.labels, head.info);
    const sums = new Float64Array(labels.length * d), counts = new Float64Array(labels.length);
    for (let i = 0; i < this.replayY.length; i++) {
      const c = labels.indexOf(names[this.replayY[i]]);
      if (c < 0) continue;
      counts[c]++;
      for (let t = 0; t < d; t++) sums[c * d + t] += this.replayX[i * d + t];
    }
    for (const s of samples) {
      const c = labels.indexOf(s.label);
      counts[c]++;
      for (let t = 0; t < d; t++) sums[c * d + t] += s.feature[t];
    }
    const present = labels.map((_, c) => c).filter((c) => counts[c] > 0);
    const means = new Float32Array(present.length * d);
    present.forEach((c, j) => { for (let t = 0; t < d; t++) means[j * d + t] = sums[c * d + t] / counts[c]; });
    return { labels: present.map((c) => labels[c]), means };
  }

  /** Scores of features x (n x d) under mode 'head' (temperature-calibrated), 'ncm' or 'head+ncm'. */
  async scores(x, n, mode, head) {
    if (mode === "head" || mode === L.HEAD_AND_NEW) {
      const t = head.info.temperature ? head.info.temperature.value : null;
      const probs = L.withTemperature(L.headPredict(x, n, head.layers), n, head.labels.length, t);
      if (mode === "head") return { labels: head.labels, probs };
      const { labels, means } = await this.classMeans(head);
      const ncm = L.ncmPredict(x, n, this.meta.feature_dim, means, labels.length, this.centre());
      return L.headWithNewMeans(probs, head.labels, ncm, labels, n);
    }
    const { labels, means } = await this.classMeans(head);
    return { labels, probs: L.ncmPredict(x, n, this.meta.feature_dim, means, labels.length, this.centre()) };
  }

  async predict(blob, { mode = "auto", unknownBelow = null, top = 3 } = {}) {
    await this.ready;
    if (!MODES.includes(mode)) throw new EdgetlError(`mode must be one of ${MODES.join(", ")}; received ${JSON.stringify(mode)}`);
    const t0 = performance.now();
    const head = await this.head();
    const [used, reason] = L.answerMode(mode, head, Object.keys(await this.counts()));
    const feature = blob instanceof Float32Array ? blob : await this.features(await this.pixels(blob, blob.name || "photo"));
    const { labels, probs } = await this.scores(feature, 1, used, head);
    const order = labels.map((_, j) => j).sort((a, b) => probs[b] - probs[a]).slice(0, top);
    const best = order[0], unknown = unknownBelow !== null && probs[best] < unknownBelow;
    return { label: unknown ? null : labels[best], score: probs[best], unknown,
      top: order.map((j) => ({ label: labels[j], score: probs[j] })), version: head.version, mode: used,
      mode_reason: mode === "auto" ? reason || "the trained head" : null, ms: performance.now() - t0 };
  }

  async history() {
    await this.ready;
    const active = await this.store.get("meta", "active");
    return (await this.store.all("heads")).map((h) => ({ version: h.version, labels: h.labels, created: h.created,
      active: h.version === active, info: h.info }));
  }

  async rollback(version) {
    await this.ready;
    const h = await this.store.get("heads", version);
    if (!h) throw new EdgetlError(`no head version ${version}; versions: ${(await this.history()).map((v) => v.version).join(", ")}`);
    await this.store.put("meta", version, "active");
    return { version, labels: h.labels };
  }

  /** The page's personalized state as the JSON document `POST /api/sync` and
   * `edgetl-device import` take: the stored features (not photos) and the active head. */
  async export() {
    await this.ready;
    const head = await this.head();
    return {
      format: "edgetl-phone-state", format_version: 1, bundle_sha256: this.meta.bundle_sha256,
      backbone_file: this.meta.backbone_file, backbone_sha256: this.meta.backbone_sha256,
      samples: (await this.samples()).map((s) => ({ label: s.label, digest: s.digest, source: s.source, feature: b64.encode(s.feature) })),
      head: { version: head.version, labels: head.labels, info: head.info,
        layers: head.layers.map((l) => ({ W: b64.encode(l.W), b: b64.encode(l.b), shape: [l.W.length / l.b.length, l.b.length] })) },
    };
  }

  /** Both ways with the Pi that serves this page: the page's samples go there (features only),
   * the Pi's samples and active head come here (a new head version, made active). */
  async sync({ url = new URL("../", ROOT).href, token = null } = {}) {
    await this.ready;
    const headers = { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) };
    const api = new URL("api/sync", url).href;
    const sent = await fetch(api, { method: "POST", headers, body: JSON.stringify(await this.export()) });
    const pushed = await sent.json();
    if (!sent.ok) throw new EdgetlError(`the Pi refused the page's samples: ${pushed.error || sent.status}`);
    const got = await fetch(api, { headers });
    const doc = await got.json();
    if (!got.ok) throw new EdgetlError(`cannot read the Pi's state: ${doc.error || got.status}`);
    if (doc.backbone_sha256 !== this.meta.backbone_sha256) throw new EdgetlError(`the Pi computes features with ${doc.backbone_file}, this page with ${this.meta.backbone_file}; their features cannot be mixed`);
    const have = new Set((await this.samples()).map((s) => `${s.label}\n${s.digest}`));
    const fresh = doc.samples.filter((s) => !have.has(`${s.label}\n${s.digest}`));
    const versions = (await this.store.all("heads")).map((h) => h.version);
    const version = Math.max(...versions) + 1;
    const layers = doc.head.layers.map((l) => ({ W: b64.floats(l.W), b: b64.floats(l.b) }));
    // The Pi's head becomes the active one only if it knows every class this page has learned
    // (else it is kept as a version to roll back to: syncing never silently forgets a class).
    const mine = (await this.head()).labels;
    const activate = mine.every((l) => doc.head.labels.includes(l));
    await this.store.tx(["samples", "heads", "meta"], "readwrite", async (t) => {
      for (const s of fresh) t.objectStore("samples").add({ label: s.label, feature: b64.floats(s.feature), digest: s.digest, source: s.source, thumb: null, added: Date.now() });
      t.objectStore("heads").put({ version, labels: doc.head.labels, layers, created: Date.now(),
        info: { ...doc.head.info, origin: "pi", pi_version: doc.head.version } });
      if (activate) t.objectStore("meta").put(version, "active");
    });
    return { sent: pushed, received: fresh.length, version, activated: activate };
  }
}

export const edgetl = new Device();
if (typeof window !== "undefined") window.edgetl = edgetl;
