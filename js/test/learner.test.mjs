// The page's learner against the Python learner (fixtures from tests/phone_fixtures.py, in the
// folder EDGETL_JS_FIXTURES): same labels, probabilities within 1e-3, same bias and temperature.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import * as L from "../../edgetl/device/phone/app/learner.js";
import { normalize, resizeRGB } from "../../edgetl/device/phone/app/preprocess.js";

const dir = process.env.EDGETL_JS_FIXTURES;
const skip = !dir || !existsSync(join(dir ?? "", "learner.json")) ? "set EDGETL_JS_FIXTURES (python -m tests.phone_fixtures BUNDLE DIR)" : false;
const f32 = (name) => { const b = readFileSync(join(dir, name)); return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4); };
const i32 = (name) => { const b = readFileSync(join(dir, name)); return new Int32Array(b.buffer, b.byteOffset, b.byteLength / 4); };
const u8 = (name) => new Uint8Array(readFileSync(join(dir, name)));

test("Pillow's bilinear resize, pixel for pixel", { skip }, () => {
  const cases = JSON.parse(readFileSync(join(dir, "resize.json"), "utf8"));
  cases.forEach((c, i) => {
    const got = resizeRGB(u8(`resize_${i}_in.u8`), c.w, c.h, c.size), want = u8(`resize_${i}_out.u8`);
    assert.equal(got.length, want.length);
    let diff = 0;
    for (let j = 0; j < got.length; j++) diff += got[j] !== want[j] ? 1 : 0;
    assert.equal(diff, 0, `${c.w}x${c.h} -> ${c.size}: ${diff} of ${got.length} values differ`);
  });
});

test("MobileNetV2 scaling in float32", () => {
  const x = normalize(Uint8Array.from([0, 127, 255]), { scale: 1 / 127.5, offset: [-1, -1, -1], channel_order: "RGB" });
  assert.deepEqual(Array.from(x), [-1, Math.fround(Math.fround(127 * Math.fround(1 / 127.5)) - 1), 1]);
});

test("the solver converges to the optimum of a small problem", () => {
  const x = Float32Array.from([0, 0, 1, 0, 0, 1, 1, 1, 2, 0.5, 0.5, 2]), y = Int32Array.from([0, 1, 2, 2, 1, 0]);
  const { head, info } = L.solveSoftmax(x, 6, 2, y, 3, 0.1, { gtol: 1e-9 });
  assert.ok(info.converged && info.grad_max <= 1e-9, JSON.stringify(info));
  assert.ok(Math.abs(head.b.reduce((a, v) => a + v, 0)) < 1e-5); // centred biases
});

function fixtureBundle(doc) {
  const d = doc.feature_dim, basis = f32("basis.f32"), mean = f32("basis_mean.f32");
  const replayX = f32("replay.f32"), replayY = i32("replay_labels.i32"), coords = new Map();
  const n = replayY.length, centre = new Float32Array(d);
  for (let i = 0; i < n; i++) for (let t = 0; t < d; t++) centre[t] += replayX[i * d + t] / n;
  return {
    labels: doc.bundle_labels, featureDim: d, replayX, replayY, digest: doc.digest, centre,
    subspace(dim) { return new L.Subspace(mean, basis.subarray(0, dim * d), d); },
    replayCoords(dim) { if (!coords.has(dim)) coords.set(dim, this.subspace(dim).project(replayX, n)); return coords.get(dim); },
  };
}

function linear(flat, d, c) { return { W: flat.slice(0, d * c), b: flat.slice(d * c, d * c + c) }; }

test("a retrain gives the Python learner's head: labels, bias, temperature, probabilities", { skip }, () => {
  const doc = JSON.parse(readFileSync(join(dir, "learner.json"), "utf8"));
  const d = doc.feature_dim, bundle = fixtureBundle(doc), stored = f32("stored.f32");
  const samples = doc.samples.map((s, i) => ({ ...s, feature: stored.slice(i * d, (i + 1) * d) }));
  const current = { ...doc.head1, layers: [linear(f32("head1.f32"), d, doc.head1.labels.length)] };
  const r = L.retrain(bundle, samples, current, new Map());
  const want = doc.result;
  assert.deepEqual(r.labels, want.labels);
  assert.equal(r.activated, want.activated);
  assert.equal(r.info.new_class_bias.bias, want.new_class_bias.bias);
  assert.equal(r.info.new_class_bias.cost, want.new_class_bias.cost);
  assert.ok(Math.abs(r.info.temperature.value - want.temperature.value) <= 2e-4, `${r.info.temperature.value} vs ${want.temperature.value}`);
  assert.equal(r.info.ncm_check.head, want.ncm_check.head);
  assert.equal(r.info.ncm_check.ncm, want.ncm_check.ncm);
  // The probe photos (not trained on) through both heads, temperature-calibrated.
  const n = doc.probe_count, C = want.labels.length, probe = f32("probe.f32");
  const mine = L.withTemperature(L.headPredict(probe, n, r.layers), n, C, r.info.temperature.value);
  const theirs = f32("probe_probs.f32");
  let worst = 0;
  for (let i = 0; i < mine.length; i++) worst = Math.max(worst, Math.abs(mine[i] - theirs[i]));
  assert.deepEqual(Array.from(L.argmaxRows(mine, n, C)), Array.from(L.argmaxRows(theirs, n, C)));
  assert.ok(worst <= 1e-3, `largest probability difference ${worst}`);
  console.log(`# parity: largest probability difference ${worst.toExponential(2)} on ${n} probe photos; ` +
    `page solver ${r.info.solver.iterations} iterations, grad ${r.info.solver.grad_max.toExponential(1)}; ${r.info.seconds} s`);
});

test("nearest class mean gives the Python learner's scores", { skip }, () => {
  const doc = JSON.parse(readFileSync(join(dir, "learner.json"), "utf8"));
  const d = doc.feature_dim, bundle = fixtureBundle(doc), stored = f32("stored.f32"), n = doc.probe_count;
  const labels = doc.ncm_labels, means = new Float32Array(labels.length * d), counts = new Float64Array(labels.length);
  const sums = new Float64Array(labels.length * d);
  bundle.replayY.forEach((c, i) => { const j = labels.indexOf(doc.bundle_labels[c]); counts[j]++; for (let t = 0; t < d; t++) sums[j * d + t] += bundle.replayX[i * d + t]; });
  doc.samples.forEach((s, i) => { const j = labels.indexOf(s.label); counts[j]++; for (let t = 0; t < d; t++) sums[j * d + t] += stored[i * d + t]; });
  for (let j = 0; j < labels.length; j++) for (let t = 0; t < d; t++) means[j * d + t] = sums[j * d + t] / counts[j];
  const mine = L.ncmPredict(f32("probe.f32"), n, d, means, labels.length, bundle.centre), theirs = f32("probe_ncm.f32");
  let worst = 0;
  for (let i = 0; i < mine.length; i++) worst = Math.max(worst, Math.abs(mine[i] - theirs[i]));
  assert.ok(worst <= 1e-4, `largest difference ${worst}`);
});

test("before 'train', the head and the new classes' means give the Python learner's scores", { skip }, () => {
  const doc = JSON.parse(readFileSync(join(dir, "learner.json"), "utf8"));
  const n = doc.probe_count, head1 = doc.head1, C = head1.labels.length, d = doc.feature_dim;
  const layers = [linear(f32("head1.f32"), d, C)];
  const t = head1.info.temperature ? head1.info.temperature.value : null;
  const headProbs = L.withTemperature(L.headPredict(f32("probe.f32"), n, layers), n, C, t);
  const { labels, probs } = L.headWithNewMeans(headProbs, head1.labels, f32("probe_ncm.f32"), doc.ncm_labels, n);
  assert.deepEqual(labels, doc.mixed_labels);
  const theirs = f32("probe_mixed.f32");
  let worst = 0;
  for (let i = 0; i < probs.length; i++) worst = Math.max(worst, Math.abs(probs[i] - theirs[i]));
  assert.ok(worst <= 1e-4, `largest difference ${worst}`);
  assert.equal(L.answerMode("auto", head1, ["ants"])[0], L.HEAD_AND_NEW);
});
