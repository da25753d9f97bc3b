// The device learner's maths in the page: the recipe of `edgetl-device train`, ported from
// edgetl/head (solver, calibration, ncm) and edgetl/device/retrain.py. No DOM and no network:
// the page imports it, and `node --test` checks it against fixtures written by the Python learner.
//
// Shapes: a feature matrix is a Float32Array, row-major (n x d). A linear head is
// {W: Float32Array (d x C, row-major), b: Float32Array (C)}; `layers` is a list of such heads
// (hidden layers with ReLU, then softmax), as in edgetl/head/arrays.py.

export const SUBSPACE_DIM = 160;
export const RESIDUAL_DIRECTIONS = 64;
export const REPLAY_HELD_BACK_EVERY = 5;
export const GUARD_MIN_PHOTOS = 50;
export const BIAS_GRID = Array.from({ length: 17 }, (_, i) => i * 0.25);
export const DEFAULTS = Object.freeze({
  l2: 0.3, balance: true, oldClassBudget: 0.02, subspaceDim: SUBSPACE_DIM,
  residualDirections: RESIDUAL_DIRECTIONS, maxIter: 300, gtol: 1e-6, memory: 20,
});

// -- small linear algebra -------------------------------------------------------------------------
export function halfToFloat(h) {
  const s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

export function halvesToFloats(u16) {
  const out = new Float32Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = halfToFloat(u16[i]);
  return out;
}

function rows(x, n, idx, d) { // the rows idx of x (n x d) as a new matrix
  const out = new Float32Array(idx.length * d);
  for (let r = 0; r < idx.length; r++) out.set(x.subarray(idx[r] * d, idx[r] * d + d), r * d);
  return out;
}

export function softmaxInPlace(z, n, c) {
  for (let i = 0; i < n; i++) {
    let m = -Infinity;
    for (let j = 0; j < c; j++) m = Math.max(m, z[i * c + j]);
    let s = 0;
    for (let j = 0; j < c; j++) { const e = Math.exp(z[i * c + j] - m); z[i * c + j] = e; s += e; }
    for (let j = 0; j < c; j++) z[i * c + j] /= s;
  }
  return z;
}

/** Logits of one dense layer: x (n x d) @ W (d x C) + b, as Float64Array (n x C). */
export function dense(x, n, d, layer) {
  const c = layer.b.length, out = new Float64Array(n * c), W = layer.W;
  for (let i = 0; i < n; i++) {
    const xo = i * d, oo = i * c;
    for (let j = 0; j < c; j++) out[oo + j] = layer.b[j];
    for (let k = 0; k < d; k++) {
      const v = x[xo + k];
      if (v === 0) continue;
      const wo = k * c;
      for (let j = 0; j < c; j++) out[oo + j] += v * W[wo + j];
    }
  }
  return out;
}

/** Class probabilities of a head (hidden ReLU layers, then softmax) for x (n x d). */
export function headPredict(x, n, layers) {
  let h = x, d = layers[0].W.length / layers[0].b.length;
  for (let l = 0; l < layers.length; l++) {
    const z = dense(h, n, d, layers[l]);
    if (l === layers.length - 1) return softmaxInPlace(z, n, layers[l].b.length);
    for (let i = 0; i < z.length; i++) z[i] = Math.max(z[i], 0);
    h = z; d = layers[l].b.length;
  }
  throw new Error("a head needs at least one layer");
}

export function argmaxRows(p, n, c) {
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    let best = 0;
    for (let j = 1; j < c; j++) if (p[i * c + j] > p[i * c + best]) best = j;
    out[i] = best;
  }
  return out;
}

function accuracy(pred, y) {
  let ok = 0;
  for (let i = 0; i < y.length; i++) ok += pred[i] === y[i] ? 1 : 0;
  return y.length ? ok / y.length : NaN;
}

// -- the converged solver (edgetl/head/solver.py) ---------------------------------------------------
export function balancedWeights(y, c) {
  const counts = new Float64Array(c);
  for (const v of y) counts[v]++;
  let present = 0;
  for (const v of counts) present += v > 0 ? 1 : 0;
  const per = Array.from(counts, (v) => (v > 0 ? y.length / (Math.max(present, 1) * v) : 0));
  return Float64Array.from(y, (v) => per[v]);
}

/** Minimise f (returning [value, gradient]) from theta0 by L-BFGS with a strong-Wolfe line
 * search; stops when the largest gradient component is below gtol. */
export function lbfgs(f, theta0, { gtol = 1e-6, maxIter = 300, memory = 20 } = {}) {
  let x = Float64Array.from(theta0);
  let [fx, g] = f(x);
  let evals = 1, iter = 0;
  const S = [], Y = [], RHO = [];
  const maxAbs = (v) => { let m = 0; for (const a of v) m = Math.max(m, Math.abs(a)); return m; };
  const dot = (a, b) => { let s = 0; for (let i = 0; i < a.length; i++) s += a[i] * b[i]; return s; };
  while (maxAbs(g) > gtol && iter < maxIter) {
    // Two-loop recursion: the search direction -H g.
    const q = Float64Array.from(g), alpha = new Float64Array(S.length);
    for (let i = S.length - 1; i >= 0; i--) {
      alpha[i] = RHO[i] * dot(S[i], q);
      for (let j = 0; j < q.length; j++) q[j] -= alpha[i] * Y[i][j];
    }
    const gamma = S.length ? dot(S[S.length - 1], Y[Y.length - 1]) / dot(Y[Y.length - 1], Y[Y.length - 1]) : 1 / Math.max(maxAbs(g), 1);
    for (let j = 0; j < q.length; j++) q[j] *= gamma;
    for (let i = 0; i < S.length; i++) {
      const beta = RHO[i] * dot(Y[i], q);
      for (let j = 0; j < q.length; j++) q[j] += S[i][j] * (alpha[i] - beta);
    }
    for (let j = 0; j < q.length; j++) q[j] = -q[j];
    let dg0 = dot(g, q);
    if (!(dg0 < 0)) { // not a descent direction: restart from steepest descent
      S.length = Y.length = RHO.length = 0;
      for (let j = 0; j < q.length; j++) q[j] = -g[j] / Math.max(maxAbs(g), 1);
      dg0 = dot(g, q);
    }
    const ls = wolfe(f, x, fx, g, q, dg0);
    evals += ls.evals;
    if (!ls.ok) break;
    const s = new Float64Array(x.length), yv = new Float64Array(x.length);
    for (let j = 0; j < x.length; j++) { s[j] = ls.x[j] - x[j]; yv[j] = ls.g[j] - g[j]; }
    const sy = dot(s, yv);
    if (sy > 1e-12) {
      S.push(s); Y.push(yv); RHO.push(1 / sy);
      if (S.length > memory) { S.shift(); Y.shift(); RHO.shift(); }
    }
    const fPrev = fx;
    x = ls.x; fx = ls.f; g = ls.g; iter++;
    if (Math.abs(fPrev - fx) <= 1e-15 * Math.max(Math.abs(fPrev), Math.abs(fx), 1)) break;
  }
  return { x, f: fx, g, iterations: iter, evaluations: evals, gradMax: maxAbs(g), converged: maxAbs(g) <= gtol };
}

function wolfe(f, x0, f0, g0, p, dg0, c1 = 1e-4, c2 = 0.9) {
  // Nocedal & Wright, algorithms 3.5 and 3.6 (bracketing, then zoom by cubic interpolation).
  const at = (a) => {
    const x = new Float64Array(x0.length);
    for (let j = 0; j < x.length; j++) x[j] = x0[j] + a * p[j];
    const [fx, g] = f(x);
    let dg = 0;
    for (let j = 0; j < g.length; j++) dg += g[j] * p[j];
    return { a, x, f: fx, g, dg };
  };
  let evals = 0;
  let prev = { a: 0, f: f0, dg: dg0 }, a = 1;
  const zoom = (lo, hi) => {
    for (let k = 0; k < 30; k++) {
      let aj = cubic(lo, hi);
      const span = Math.abs(hi.a - lo.a);
      if (!Number.isFinite(aj) || aj <= Math.min(lo.a, hi.a) + 0.1 * span || aj >= Math.max(lo.a, hi.a) - 0.1 * span) {
        aj = (lo.a + hi.a) / 2;
      }
      const t = at(aj); evals++;
      if (t.f > f0 + c1 * aj * dg0 || t.f >= lo.f) hi = t;
      else {
        if (Math.abs(t.dg) <= -c2 * dg0) return { ok: true, ...t, evals };
        if (t.dg * (hi.a - lo.a) >= 0) hi = lo;
        lo = t;
      }
    }
    return lo.x ? { ok: lo.f < f0, ...lo, evals } : { ok: false, evals };
  };
  for (let i = 0; i < 40; i++) {
    const t = at(a); evals++;
    if (!Number.isFinite(t.f) || t.f > f0 + c1 * a * dg0 || (i > 0 && t.f >= prev.f)) return zoom(prev, t);
    if (Math.abs(t.dg) <= -c2 * dg0) return { ok: true, ...t, evals };
    if (t.dg >= 0) return zoom(t, prev);
    prev = t; a *= 2;
  }
  return { ok: false, evals };
}

function cubic(lo, hi) { // the minimiser of the cubic through (a, f, dg) at both ends
  const d1 = lo.dg + hi.dg - 3 * (lo.f - hi.f) / (lo.a - hi.a);
  const d2sq = d1 * d1 - lo.dg * hi.dg;
  if (!(d2sq >= 0)) return NaN;
  const d2 = Math.sign(hi.a - lo.a) * Math.sqrt(d2sq);
  return hi.a - (hi.a - lo.a) * (hi.dg + d2 - d1) / (hi.dg - lo.dg + 2 * d2);
}

/** The L2-regularised softmax regression of y on x (n x d): solve_softmax of head/solver.py. */
export function solveSoftmax(x, n, d, y, c, l2, { balance = true, init = null, gtol = DEFAULTS.gtol,
  maxIter = DEFAULTS.maxIter, memory = DEFAULTS.memory } = {}) {
  if (!n) throw new Error("no training samples");
  const mean = new Float64Array(d);
  for (let i = 0; i < n; i++) for (let k = 0; k < d; k++) mean[k] += x[i * d + k];
  for (let k = 0; k < d; k++) mean[k] /= n;
  const xc = new Float64Array(n * d);
  for (let i = 0; i < n; i++) for (let k = 0; k < d; k++) xc[i * d + k] = x[i * d + k] - mean[k];
  const sw = balance ? balancedWeights(y, c) : new Float64Array(n).fill(1);
  let swSum = 0;
  for (const v of sw) swSum += v;
  const swn = sw.map((v) => v / swSum);
  const z = new Float64Array(c), gw = new Float64Array(c * d);
  // Internally theta holds W class-major (c x d, each class's weights contiguous) then b: the
  // products run over long contiguous rows; the head goes out row-major (d x c) like Python's.
  const fg = (theta) => {
    const grad = new Float64Array(theta.length);
    gw.fill(0);
    let loss = 0;
    for (let i = 0; i < n; i++) {
      const xo = i * d;
      let m = -Infinity;
      for (let j = 0; j < c; j++) {
        let s = theta[c * d + j];
        const wo = j * d;
        for (let k = 0; k < d; k++) s += xc[xo + k] * theta[wo + k];
        z[j] = s;
        if (s > m) m = s;
      }
      let s = 0;
      const zy = z[y[i]];
      for (let j = 0; j < c; j++) { z[j] = Math.exp(z[j] - m); s += z[j]; }
      loss += swn[i] * (Math.log(s) + m - zy);
      for (let j = 0; j < c; j++) {
        const r = swn[i] * (z[j] / s - (j === y[i] ? 1 : 0));
        grad[c * d + j] += r;
        const go = j * d;
        for (let k = 0; k < d; k++) grad[go + k] += r * xc[xo + k];
      }
    }
    let ww = 0;
    for (let t = 0; t < d * c; t++) { ww += theta[t] * theta[t]; grad[t] += l2 * theta[t]; }
    return [loss + 0.5 * l2 * ww, grad];
  };
  const theta0 = new Float64Array(d * c + c);
  if (init) {
    for (let k = 0; k < d; k++) for (let j = 0; j < c; j++) theta0[j * d + k] = init.W[k * c + j];
    for (let j = 0; j < c; j++) {
      let s = init.b[j];
      for (let k = 0; k < d; k++) s += mean[k] * init.W[k * c + j];
      theta0[d * c + j] = s;
    }
  }
  const r = lbfgs(fg, theta0, { gtol, maxIter, memory });
  const W = new Float32Array(d * c);
  for (let k = 0; k < d; k++) for (let j = 0; j < c; j++) W[k * c + j] = r.x[j * d + k];
  const b = new Float64Array(c);
  for (let j = 0; j < c; j++) {
    let s = r.x[d * c + j];
    for (let k = 0; k < d; k++) s -= mean[k] * r.x[j * d + k];
    b[j] = s;
  }
  const bm = b.reduce((a, v) => a + v, 0) / c;
  const info = { solver: "lbfgs", l2, iterations: r.iterations, evaluations: r.evaluations, loss: r.f,
    grad_max: r.gradMax, converged: r.converged };
  return { head: { W, b: Float32Array.from(b, (v) => v - bm) }, info };
}

// -- the subspace a retrain solves in ------------------------------------------------------------------
export class Subspace {
  constructor(mean, basis, d) { this.mean = mean; this.basis = basis; this.d = d; this.k = basis.length / d; }

  project(x, n) {
    const { d, k } = this, out = new Float32Array(n * k), c = new Float64Array(d);
    for (let i = 0; i < n; i++) {
      for (let t = 0; t < d; t++) c[t] = x[i * d + t] - this.mean[t];
      for (let r = 0; r < k; r++) {
        let s = 0;
        const bo = r * d;
        for (let t = 0; t < d; t++) s += c[t] * this.basis[bo + t];
        out[i * k + r] = s;
      }
    }
    return out;
  }

  /** This subspace plus up to `most` orthonormal directions of what of x lies outside it. */
  extended(x, n, most = RESIDUAL_DIRECTIONS) {
    const { d, k } = this;
    if (!n || most <= 0) return this;
    const coords = this.project(x, n);
    let res = [];
    let scale = 0;
    for (let i = 0; i < n; i++) {
      const r = new Float64Array(d);
      let norm = 0;
      for (let t = 0; t < d; t++) { r[t] = x[i * d + t] - this.mean[t]; norm += r[t] * r[t]; }
      scale = Math.max(scale, Math.sqrt(norm));
      for (let q = 0; q < k; q++) {
        const cq = coords[i * k + q], bo = q * d;
        for (let t = 0; t < d; t++) r[t] -= cq * this.basis[bo + t];
      }
      res.push(r);
    }
    if (res.length > most) res = rangeFinder(res, most, d);
    // Gram-Schmidt (twice, against the basis and the directions kept), dropping what is left
    // below 1e-4 of the largest centred feature: the rank rule of the Python learner's QR.
    const kept = [];
    for (const r0 of res) {
      const r = Float64Array.from(r0);
      for (let pass = 0; pass < 2; pass++) {
        for (let q = 0; q < k; q++) {
          let s = 0;
          const bo = q * d;
          for (let t = 0; t < d; t++) s += r[t] * this.basis[bo + t];
          for (let t = 0; t < d; t++) r[t] -= s * this.basis[bo + t];
        }
        for (const e of kept) {
          let s = 0;
          for (let t = 0; t < d; t++) s += r[t] * e[t];
          for (let t = 0; t < d; t++) r[t] -= s * e[t];
        }
      }
      let norm = 0;
      for (let t = 0; t < d; t++) norm += r[t] * r[t];
      norm = Math.sqrt(norm);
      if (scale > 0 && norm > 1e-4 * scale) kept.push(r.map((v) => v / norm));
    }
    const basis = new Float32Array((k + kept.length) * d);
    basis.set(this.basis);
    kept.forEach((e, i) => basis.set(Float32Array.from(e), (k + i) * d));
    return new Subspace(this.mean, basis, d);
  }

  restrict(head) { // a full linear head in coordinates
    const { d, k } = this, c = head.b.length, W = new Float32Array(k * c), b = Float32Array.from(head.b);
    for (let r = 0; r < k; r++) for (let t = 0; t < d; t++) {
      const v = this.basis[r * d + t];
      if (v === 0) continue;
      for (let j = 0; j < c; j++) W[r * c + j] += v * head.W[t * c + j];
    }
    for (let t = 0; t < d; t++) for (let j = 0; j < c; j++) b[j] += this.mean[t] * head.W[t * c + j];
    return { W, b };
  }

  lift(head) { // a head on coordinates as the same head on full features
    const { d, k } = this, c = head.b.length, W = new Float32Array(d * c), b = Float64Array.from(head.b);
    for (let r = 0; r < k; r++) for (let t = 0; t < d; t++) {
      const v = this.basis[r * d + t];
      for (let j = 0; j < c; j++) W[t * c + j] += v * head.W[r * c + j];
    }
    for (let t = 0; t < d; t++) for (let j = 0; j < c; j++) b[j] -= this.mean[t] * W[t * c + j];
    return { W, b: Float32Array.from(b) };
  }
}

function rangeFinder(res, most, d) { // `most` random combinations of the residuals (seeded)
  let seed = 12345;
  const rand = () => { // Box-Muller over a small LCG: reproducible in the page
    seed = (seed * 1103515245 + 12345) >>> 0; const u = (seed + 1) / 4294967297;
    seed = (seed * 1103515245 + 12345) >>> 0; const v = (seed + 1) / 4294967297;
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  };
  const out = [];
  for (let m = 0; m < most; m++) {
    const r = new Float64Array(d);
    for (const row of res) { const w = rand(); for (let t = 0; t < d; t++) r[t] += w * row[t]; }
    out.push(r);
  }
  return out;
}

// -- new output units, biases, temperature, nearest class mean ------------------------------------
export function addClasses(head, x, n, d, y, newIds, centre, scale = 0.25) {
  if (!newIds.length) return head;
  const c = head.b.length, c2 = c + newIds.length;
  const norms = [];
  for (let j = 0; j < c; j++) { let s = 0; for (let t = 0; t < d; t++) s += head.W[t * c + j] ** 2; norms.push(Math.sqrt(s)); }
  const med = median(norms);
  const size = scale * (norms.length && med > 0 ? med : 1);
  const levels = [];
  for (let j = 0; j < c; j++) { let s = head.b[j]; for (let t = 0; t < d; t++) s += centre[t] * head.W[t * c + j]; levels.push(s); }
  const level = c ? median(levels) : 0;
  const W = new Float32Array(d * c2), b = new Float32Array(c2);
  for (let t = 0; t < d; t++) for (let j = 0; j < c; j++) W[t * c2 + j] = head.W[t * c + j];
  b.set(head.b);
  newIds.forEach((cls, u) => {
    const dir = new Float64Array(d);
    let count = 0;
    for (let i = 0; i < n; i++) if (y[i] === cls) { count++; for (let t = 0; t < d; t++) dir[t] += x[i * d + t]; }
    let norm = 0;
    for (let t = 0; t < d; t++) { dir[t] = count ? dir[t] / count - centre[t] : 0; norm += dir[t] ** 2; }
    norm = Math.sqrt(norm);
    let cb = 0;
    for (let t = 0; t < d; t++) {
      const v = norm > 0 ? dir[t] / norm * size : dir[t];
      W[t * c2 + c + u] = v;
      cb += centre[t] * v;
    }
    b[c + u] = level - cb;
  });
  return { W, b };
}

function median(v) {
  if (!v.length) return 0;
  const s = [...v].sort((a, b) => a - b), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function dropClasses(head, keep) {
  const c = head.b.length, d = head.W.length / c, W = new Float32Array(d * keep.length);
  for (let t = 0; t < d; t++) keep.forEach((j, u) => { W[t * keep.length + u] = head.W[t * c + j]; });
  return { W, b: Float32Array.from(keep, (j) => head.b[j]) };
}

export function withBias(head, bias, labels) {
  if (!bias || !bias.bias) return head;
  const b = Float32Array.from(head.b);
  for (const name of bias.classes) { const j = labels.indexOf(name); if (j >= 0) b[j] += bias.bias; }
  return { W: head.W, b };
}

export function withoutBias(head, info, labels) {
  const bias = info && info.new_class_bias;
  if (!bias || !bias.bias) return head;
  return withBias(head, { ...bias, bias: -bias.bias }, labels);
}

export function newClassBias(head, x, n, d, y, deviceClasses, numClasses, budget, reference) {
  const p = headPredict(x, n, [head]);
  const logp = p.map((v) => Math.log(v + 1e-30));
  const offset = new Float64Array(numClasses);
  for (const c of deviceClasses) offset[c] = 1;
  const accAt = (delta) => {
    let ok = 0;
    for (let i = 0; i < n; i++) {
      let best = 0, bv = -Infinity;
      for (let j = 0; j < numClasses; j++) { const v = logp[i * numClasses + j] + delta * offset[j]; if (v > bv) { bv = v; best = j; } }
      ok += best === y[i] ? 1 : 0;
    }
    return ok / n;
  };
  const without = accAt(0);
  let chosen = 0, cost = reference - without;
  for (const delta of BIAS_GRID.slice(1)) {
    const acc = accAt(delta);
    if (reference - acc > budget + 1e-9) break;
    chosen = delta; cost = reference - acc;
  }
  const judged = n >= GUARD_MIN_PHOTOS;
  return { bias: chosen, budget, held_back_replay: n, reference_accuracy: reference,
    cost_without_bias: round(reference - without, 6), cost: round(cost, 6), judged,
    within_budget: !judged || reference - without <= budget + 1e-9 };
}

function round(v, digits) { const f = 10 ** digits; return Math.round(v * f) / f; }

/** The temperature that best calibrates probs (n x c) on labels y (least mean NLL), by golden
 * section with parabolic steps (Brent) on [0.05, 20]. Returns [T, nll(1), nll(T)]. */
export function fitTemperature(probs, n, c, y, xatol = 1e-6) {
  const logits = probs.map((v) => Math.log(Math.max(v, 1e-30)));
  const nll = (t) => {
    let s = 0;
    for (let i = 0; i < n; i++) {
      let m = -Infinity;
      for (let j = 0; j < c; j++) m = Math.max(m, logits[i * c + j] / t);
      let e = 0;
      for (let j = 0; j < c; j++) e += Math.exp(logits[i * c + j] / t - m);
      s += Math.log(e) + m - logits[i * c + y[i]] / t;
    }
    return s / n;
  };
  const t = brent(nll, 0.05, 20, xatol);
  return [t, nll(1), nll(t)];
}

function brent(f, a, b, xatol) { // bounded scalar minimisation (Brent's method, as SciPy's 'bounded')
  const g = 0.5 * (3 - Math.sqrt(5));
  let x = a + g * (b - a), w = x, v = x, fx = f(x), fw = fx, fv = fx, d = 0, e = 0;
  for (let it = 0; it < 500; it++) {
    const m = 0.5 * (a + b), tol1 = 1.4901161193847656e-8 * Math.abs(x) + xatol / 3, tol2 = 2 * tol1;
    if (Math.abs(x - m) <= tol2 - 0.5 * (b - a)) break;
    let golden = true;
    if (Math.abs(e) > tol1) {
      let r = (x - w) * (fx - fv), q = (x - v) * (fx - fw), p = (x - v) * q - (x - w) * r;
      q = 2 * (q - r);
      if (q > 0) p = -p;
      q = Math.abs(q);
      const eOld = e;
      e = d;
      if (Math.abs(p) < Math.abs(0.5 * q * eOld) && p > q * (a - x) && p < q * (b - x)) {
        d = p / q; golden = false;
        const u = x + d;
        if (u - a < tol2 || b - u < tol2) d = x < m ? tol1 : -tol1;
      }
    }
    if (golden) { e = (x >= m ? a : b) - x; d = g * e; }
    const u = x + (Math.abs(d) >= tol1 ? d : (d > 0 ? tol1 : -tol1));
    const fu = f(u);
    if (fu <= fx) {
      if (u >= x) a = x; else b = x;
      v = w; fv = fw; w = x; fw = fx; x = u; fx = fu;
    } else {
      if (u < x) a = u; else b = u;
      if (fu <= fw || w === x) { v = w; fv = fw; w = u; fw = fu; } else if (fu <= fv || v === x || v === w) { v = u; fv = fu; }
    }
  }
  return x;
}

export function withTemperature(probs, n, c, t) {
  if (!t || t === 1 || !n) return probs;
  const z = new Float64Array(probs.length);
  for (let i = 0; i < z.length; i++) z[i] = Math.log(Math.max(probs[i], 1e-30)) / t;
  return softmaxInPlace(z, n, c);
}

/** Cosine nearest class mean on features centred on `centre`: scores are a softmax over
 * similarities (ncm_predict of head/ncm.py). */
export function ncmPredict(x, n, d, means, m, centre, temperature = 10) {
  const mn = normalisedMeans(means, m, d, centre);
  const out = new Float64Array(n * m), xc = new Float64Array(d);
  for (let i = 0; i < n; i++) {
    let norm = 0;
    for (let t = 0; t < d; t++) { xc[t] = x[i * d + t] - (centre ? centre[t] : 0); norm += xc[t] ** 2; }
    norm = Math.max(Math.sqrt(norm), 1e-12);
    for (let j = 0; j < m; j++) {
      let s = 0;
      for (let t = 0; t < d; t++) s += xc[t] * mn[j * d + t];
      out[i * m + j] = temperature * s / norm;
    }
  }
  return softmaxInPlace(out, n, m);
}

function normalisedMeans(means, m, d, centre) {
  const mn = new Float64Array(m * d);
  for (let j = 0; j < m; j++) {
    let norm = 0;
    for (let t = 0; t < d; t++) { mn[j * d + t] = means[j * d + t] - (centre ? centre[t] : 0); norm += mn[j * d + t] ** 2; }
    norm = Math.max(Math.sqrt(norm), 1e-12);
    for (let t = 0; t < d; t++) mn[j * d + t] /= norm;
  }
  return mn;
}

// -- one retrain (edgetl/device/retrain.py) --------------------------------------------------------
function everyKth(y, rowsMask, every, classes) {
  const back = new Uint8Array(y.length);
  const cls = classes ?? [...new Set(Array.from(y).filter((_, i) => rowsMask[i]))].sort((a, b) => a - b);
  for (const c of cls) {
    let seen = 0;
    for (let i = 0; i < y.length; i++) {
      if (y[i] === c && rowsMask[i]) { seen++; if (seen % every === 0) back[i] = 1; }
    }
  }
  return back;
}

export function bundleNames(bundleLabels, info) {
  const renamed = info && typeof info.bundle_names === "object" && info.bundle_names ? info.bundle_names : {};
  return bundleLabels.map((b) => String(renamed[b] ?? b));
}

/**
 * Retrain the head: `bundle` {labels, featureDim, replayX, replayY, basisMean, basis (rows)},
 * `samples` [{id, label, feature}] in the order they were stored, `current` {version, labels,
 * layers, info}, `cache` a Map kept between trainings (the reference fits), `cfg` over DEFAULTS.
 * Returns {labels, layers (full feature space), info, activated} like Learner.train.
 */
export function retrain(bundle, samples, current, cache, cfg = {}, force = false) {
  cfg = { ...DEFAULTS, ...cfg };
  const t0 = now();
  const d = bundle.featureDim;
  if (current.layers.length !== 1) throw new Error("the page retrains heads without hidden layers; this head has " + (current.layers.length - 1));
  const labels = [...current.labels];
  const counts = new Map();
  for (const s of samples) counts.set(s.label, (counts.get(s.label) ?? 0) + 1);
  const fresh = [...counts.keys()].filter((l) => !labels.includes(l));
  let labelsAll = [...labels, ...fresh];
  const names = bundleNames(bundle.labels, current.info);
  // The training set: replay rows of the classes still known (in order), then the stored samples.
  const index = new Map(labelsAll.map((l, i) => [l, i]));
  const toIndex = names.map((nm) => index.get(nm) ?? -1);
  const replayRows = [], y0 = [], ids = [];
  for (let r = 0; r < bundle.replayY.length; r++) {
    const c = toIndex[bundle.replayY[r]];
    if (c >= 0) { replayRows.push(r); y0.push(c); ids.push(-1 - r); }
  }
  const stored = samples.filter((s) => index.has(s.label));
  for (const s of stored) { y0.push(index.get(s.label)); ids.push(s.id); }
  if (!y0.length) throw new Error("nothing to train on: no stored samples and no replay features; add some photos first");
  const nReplay = replayRows.length, nStored = stored.length, n = nReplay + nStored;
  const storedX = new Float32Array(nStored * d);
  stored.forEach((s, i) => storedX.set(s.feature, i * d));
  const rowAt = (i) => (i < nReplay ? bundle.replayX.subarray(replayRows[i] * d, replayRows[i] * d + d) : storedX.subarray((i - nReplay) * d, (i - nReplay + 1) * d));
  let y = Int32Array.from(y0);
  // Class sums (for the new units' centre and the NCM check).
  let sums = new Float64Array(labelsAll.length * d);
  for (let i = 0; i < n; i++) { const r = rowAt(i), o = y[i] * d; for (let t = 0; t < d; t++) sums[o + t] += r[t]; }
  const centreAll = new Float32Array(d);
  for (let c = 0; c < labelsAll.length; c++) for (let t = 0; t < d; t++) centreAll[t] += sums[c * d + t];
  for (let t = 0; t < d; t++) centreAll[t] /= n;
  let start = withoutBias(current.layers[0], current.info, labels);
  const storedY = y.subarray(nReplay);
  let layer = addClasses(start, storedX, nStored, d, storedY, fresh.map((l) => labelsAll.indexOf(l)), centreAll);
  // A class with no samples left is dropped from the new head.
  const present = new Set(y);
  const missing = labelsAll.filter((_, c) => !present.has(c));
  let newNames = fresh;
  if (missing.length) {
    const keep = labelsAll.map((_, c) => c).filter((c) => present.has(c));
    if (!keep.length) throw new Error("no class has samples to train on");
    const remap = new Int32Array(labelsAll.length).fill(-1);
    keep.forEach((c, i) => { remap[c] = i; });
    layer = dropClasses(layer, keep);
    y = y.map((c) => remap[c]);
    const s2 = new Float64Array(keep.length * d);
    keep.forEach((c, i) => s2.set(sums.subarray(c * d, c * d + d), i * d));
    sums = s2;
    labelsAll = keep.map((c) => labelsAll[c]);
    newNames = fresh.filter((l) => !missing.includes(l));
  }
  const C = labelsAll.length;
  // The subspace: the shipped principal directions plus the stored photos' own.
  const base = bundle.subspace(cfg.subspaceDim);
  const sub = base.extended(storedX, nStored, cfg.residualDirections);
  const k = sub.k;
  const x = new Float32Array(n * k);
  const baseCoords = bundle.replayCoords(cfg.subspaceDim);
  const extraRows = sub.basis.subarray(base.k * d);
  const storedZ = sub.project(storedX, nStored);
  for (let i = 0; i < nReplay; i++) {
    const r = replayRows[i];
    x.set(baseCoords.subarray(r * base.k, r * base.k + base.k), i * k);
    const row = bundle.replayX.subarray(r * d, r * d + d);
    for (let q = 0; q < k - base.k; q++) {
      let s = 0;
      for (let t = 0; t < d; t++) s += (row[t] - sub.mean[t]) * extraRows[q * d + t];
      x[i * k + base.k + q] = s;
    }
  }
  x.set(storedZ, nReplay * k);
  layer = sub.restrict(layer);
  const solved = { subspace_dim: k, principal: base.k, from_samples: k - base.k };
  const fit = (startHead, idx, ys) => {
    const xs = rows(x, n, idx, k);
    const r = solveSoftmax(xs, idx.length, k, ys, startHead.b.length, cfg.l2, { balance: cfg.balance, init: startHead,
      gtol: cfg.gtol, maxIter: cfg.maxIter, memory: cfg.memory });
    Object.assign(solved, r.info);
    return r.head;
  };
  const deviceClasses = labelsAll.map((l, c) => c).filter((c) => !names.includes(labelsAll[c]));
  const old = labelsAll.map((l, c) => c).filter((c) => !deviceClasses.includes(c));
  const isReplay = Uint8Array.from(ids, (v) => (v < 0 ? 1 : 0));
  const replayBack = everyKth(y, isReplay, REPLAY_HELD_BACK_EVERY, old);
  const calibrate = cfg.oldClassBudget !== null && deviceClasses.length > 0 && old.length > 0 && replayBack.some((v) => v);
  const all = Array.from({ length: n }, (_, i) => i);
  let bias = null, checks = {}, head;
  if (calibrate) {
    const reference = referenceFit(cache, bundle, cfg, labelsAll, old, y, x, n, k, replayBack, layer, fit, solved);
    const startHead = startOldClasses(layer, reference, old, k);
    const trainIdx = all.filter((i) => !replayBack[i]), backIdx = all.filter((i) => replayBack[i]);
    const part = fit(startHead, trainIdx, Int32Array.from(trainIdx, (i) => y[i]));
    const yb = Int32Array.from(backIdx, (i) => y[i]);
    bias = newClassBias(part, rows(x, n, backIdx, k), backIdx.length, k, yb, deviceClasses, C, cfg.oldClassBudget, reference.accuracy);
    bias.classes = deviceClasses.map((c) => labelsAll[c]);
    const biased = withBias(part, bias, labelsAll);
    checks = answerChecks(biased, x, k, y, backIdx, sums, d, rowAt, bundle.centre, "replay photos of the bundle's classes");
    head = biased;
  } else {
    head = fit(layer, all, y);
  }
  const probs = headPredict(x, n, [head]);
  const trainAcc = accuracy(argmaxRows(probs, n, C), y);
  const lifted = sub.lift(head);
  let info = { origin: "train", trainer: "page", config: cfg, new_classes: newNames, dropped_classes: missing,
    num_samples: n, replay: nReplay, stored: nStored, train_accuracy: trainAcc, final_loss: solved.loss,
    parent: current.version, seconds: round((now() - t0) / 1000, 4), solver: solved, ...checks };
  const renamed = {};
  bundle.labels.forEach((b, i) => { if (names[i] !== b) renamed[b] = names[i]; });
  if (Object.keys(renamed).length) info.bundle_names = renamed;
  let activated = true;
  if (bias) {
    info.new_class_bias = bias;
    if (!bias.within_budget && !force) {
      activated = false;
      info.candidate = `not activated: with ${bias.classes.join(", ")} the bundle's classes score ${(100 * bias.cost_without_bias).toFixed(1)} points less on ${bias.held_back_replay} held-back replay photos, more than the ${100 * bias.budget} allowed; the head is kept as a candidate (train with force, or roll back to it)`;
    }
  }
  return { labels: labelsAll, layers: [lifted], info, activated };
}

function now() { return typeof performance !== "undefined" ? performance.now() : Date.now(); }

function referenceFit(cache, bundle, cfg, labelsAll, old, y, x, n, k, replayBack, layer, fit, solved) {
  const key = JSON.stringify([bundle.digest, old.map((c) => labelsAll[c]), { ...cfg, oldClassBudget: null }]);
  const hit = cache.get(key);
  if (hit) return hit;
  const remap = new Int32Array(labelsAll.length).fill(-1);
  old.forEach((c, i) => { remap[c] = i; });
  const trainIdx = [], backIdx = [];
  for (let i = 0; i < n; i++) {
    if (replayBack[i]) backIdx.push(i);
    else if (remap[y[i]] >= 0) trainIdx.push(i);
  }
  const partOld = fit(dropClasses(layer, old), trainIdx, Int32Array.from(trainIdx, (i) => remap[y[i]]));
  const p = headPredict(rows(x, n, backIdx, k), backIdx.length, [partOld]);
  const acc = accuracy(argmaxRows(p, backIdx.length, old.length), Int32Array.from(backIdx, (i) => remap[y[i]]));
  const rowsKept = solved.principal ?? k;
  const doc = { accuracy: acc, w: partOld.W.slice(0, rowsKept * old.length), rows: rowsKept, b: partOld.b };
  cache.set(key, doc);
  return doc;
}

function startOldClasses(layer, reference, old, k) {
  if (!reference.w) return layer;
  const c = layer.b.length, W = Float32Array.from(layer.W), b = Float32Array.from(layer.b);
  const m = old.length;
  for (let r = 0; r < k; r++) for (const j of old) W[r * c + j] = 0;
  for (let r = 0; r < reference.rows; r++) old.forEach((j, u) => { W[r * c + j] = reference.w[r * m + u]; });
  const bo = reference.b, boMean = bo.reduce((a, v) => a + v, 0) / m;
  const bOldMean = old.reduce((a, j) => a + layer.b[j], 0) / m;
  old.forEach((j, u) => { b[j] = bo[u] - boMean + bOldMean; });
  return { W, b };
}

function answerChecks(head, x, k, y, backIdx, sums, d, rowAt, centre, what) {
  const C = head.b.length, nb = backIdx.length;
  const yb = Int32Array.from(backIdx, (i) => y[i]);
  const probs = headPredict(rows(x, y.length, backIdx, k), nb, [head]);
  const counts = new Float64Array(C);
  for (const v of y) counts[v]++;
  const rest = Float64Array.from(sums);
  const xb = new Float32Array(nb * d);
  backIdx.forEach((i, r) => {
    const row = rowAt(i);
    xb.set(row, r * d);
    counts[y[i]]--;
    for (let t = 0; t < d; t++) rest[y[i] * d + t] -= row[t];
  });
  const present = [...counts.keys()].filter((c) => counts[c] > 0);
  const means = new Float32Array(present.length * d);
  present.forEach((c, j) => { for (let t = 0; t < d; t++) means[j * d + t] = rest[c * d + t] / counts[c]; });
  const ncm = argmaxRows(ncmPredict(xb, nb, d, means, present.length, centre), nb, present.length).map((j) => present[j]);
  const [t, before, after] = fitTemperature(probs, nb, C, yb);
  return {
    ncm_check: { held_back: what, photos: nb, head: accuracy(argmaxRows(probs, nb, C), yb), ncm: accuracy(ncm, yb) },
    temperature: { value: round(t, 4), nll_before: round(before, 4), nll_after: round(after, 4), photos: nb },
  };
}

/** What answers while some stored class is not in the head yet (Learner.answer_mode). */
export const HEAD_AND_NEW = "head+ncm";

/** Scores over the head's classes and the stored classes not in it yet (head_with_new_means of
 * head/ncm.py): class means decide between the new classes and the head's classes as a group, and
 * the head shares the group's probability among its own classes. */
export function headWithNewMeans(headProbs, headLabels, ncmProbs, ncmLabels, n) {
  const C = headLabels.length, m = ncmLabels.length;
  const fresh = ncmLabels.map((_, j) => j).filter((j) => !headLabels.includes(ncmLabels[j]));
  const width = C + fresh.length, probs = new Float32Array(n * width);
  for (let i = 0; i < n; i++) {
    let newMass = 0;
    fresh.forEach((j, u) => { newMass += ncmProbs[i * m + j]; probs[i * width + C + u] = ncmProbs[i * m + j]; });
    for (let c = 0; c < C; c++) probs[i * width + c] = headProbs[i * C + c] * (1 - newMass);
  }
  return { labels: [...headLabels, ...fresh.map((j) => ncmLabels[j])], probs };
}

/** Which of head and NCM answers `mode`, and why (Learner.answer_mode). */
export function answerMode(mode, head, storedLabels) {
  if (mode !== "auto") return [mode, null];
  const untrained = storedLabels.filter((l) => !head.labels.includes(l));
  if (untrained.length) {
    return [HEAD_AND_NEW, `the head for its classes, nearest class mean for ${untrained.join(", ")} (not in the head yet; train makes one)`];
  }
  const check = head.info && head.info.ncm_check;
  if (check && check.ncm > check.head) {
    return ["ncm", `nearest class mean: it scored ${check.ncm.toFixed(3)} against the head's ${check.head.toFixed(3)} on ${check.photos} held-back ${check.held_back}`];
  }
  return ["head", null];
}
