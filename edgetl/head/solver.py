"""The converged head solver: multinomial logistic regression by L-BFGS (NumPy + SciPy, no
TensorFlow). The workstation (``edgetl train``) and the device (``device train``'s default) both
import it from here, so both sides fit a head the same way.

The problem is the one :func:`edgetl.head.fit.train_head` descends on: (class-weighted)
mean cross-entropy + l2/2 * |W|^2, the bias not penalised, for a head without hidden layers,
solved to convergence (a convex problem: its minimum does not depend on the start, the seed or
the sample order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .arrays import Layers


def balanced_class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class: N / (C_present * n_c), 0 for a class without samples (Keras' class_weight on
    the workstation and the solvers' sample weights use the same numbers)."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    return np.where(counts > 0, len(y) / (max(present, 1) * np.maximum(counts, 1)), 0.0)


def class_weights(y: np.ndarray, num_classes: int, balance: bool) -> np.ndarray:
    """Per-sample weights: N / (C_present * n_c) when balancing, else ones."""
    if not balance:
        return np.ones(len(y), np.float32)
    return balanced_class_weights(y, num_classes)[y].astype(np.float32)


# Stop when the largest gradient component is below this: scikit-learn's default tolerance for
# the same problem (its LogisticRegression(solver="lbfgs") passes tol=1e-4 to L-BFGS-B as gtol, on
# the same scale: mean loss). On a device retrain of the flowers bundle with 10 ants + 10 bees it
# took 43 function evaluations against 54 at 1e-5, and the head differed from the one solved to
# 1e-9 by 4.5e-4 of its norm, with the same answer on every training photo.
SOLVER_GTOL = 1e-4
SOLVER_MAX_ITER = 2000
# L-BFGS's memory (SciPy's default 10). Device retrains of 6 problems on the flowers bundle (10
# ants + 10 bees, or a flower class held out and learned back, 3 draws each) took 74 function
# evaluations on average with 10 pairs, 49 with 20, 60 with 30 (the count is erratic per problem).
SOLVER_MEMORY = 20
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


_BLAS = None


def one_blas_thread():
    """A context in which BLAS runs on one thread. NumPy and SciPy each bring their own OpenBLAS;
    between the solver's many small products their idle threads spin and take the cores from each
    other, so a device retrain runs in it from start to end (threadpoolctl finds and limits both)."""
    global _BLAS
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def solve_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, balance: bool = True,
                  init: Layers | None = None, gtol: float = SOLVER_GTOL,
                  max_iter: int = SOLVER_MAX_ITER, dtype=np.float64) -> tuple[Layers, dict]:
    """The L2-regularised softmax regression of ``y`` (class indices) on ``x``, solved by
    SciPy's L-BFGS-B (the products with the features in ``dtype``: float32 halves their cost, for
    cross-validation's many rough fits and the device; the rest in float64). Returns the head
    ([(W, b)], float32) and what the solver did (iterations, function evaluations, final loss,
    largest gradient component, whether it converged)."""
    from scipy.optimize import minimize

    if l2 < 0:
        raise ConfigError(f"l2 must be >= 0; received {l2}")
    if len(x) == 0:
        raise ConfigError("no training samples")
    # Centred features: the same minimum (the bias, not penalised, absorbs the mean: b = b' - mean @ W)
    # on a far better conditioned problem (pooled features are non-negative, far from zero mean).
    x = np.asarray(x)
    mean = x.mean(axis=0, dtype=np.float64)
    x = np.asarray(x, dtype) - mean.astype(dtype)
    y = np.asarray(y, np.int64)
    n, d = x.shape
    c = int(num_classes)
    sw = class_weights(y, c, balance).astype(np.float64)
    swn = sw / sw.sum()
    target = y * n + np.arange(n)  # each sample's own logit, in the flattened (classes, samples) array
    xt = np.ascontiguousarray(x.T)
    # The products run on a class count padded to a multiple of 8 (zero rows): BLAS kernels work
    # in blocks of 8 or 16, and an odd class count costs more than the next multiple.
    rows = -(-c // 8) * 8
    w_pad = np.zeros((rows, d), dtype)
    p_pad = np.zeros((rows, n), dtype)

    # Logits as (classes, samples): the reductions over a handful of classes then run along
    # long contiguous rows (NumPy's per-row max over 7 columns cost more than the products).
    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * c].reshape(d, c), theta[d * c :]
        w_pad[:c] = w.T
        z = (w_pad @ xt)[:c].astype(np.float64)
        z += b[:, None]
        z -= z.max(axis=0)
        p = np.exp(z)
        s = p.sum(axis=0)
        loss = float(swn @ np.log(s) - swn @ z.ravel()[target]) + 0.5 * l2 * float(np.vdot(w, w))
        p /= s
        p.ravel()[target] -= 1.0
        p *= swn  # the gradient of the loss w.r.t. the logits
        p_pad[:c] = p
        grad = np.empty_like(theta)
        grad[: d * c].reshape(d, c)[:] = (p_pad @ x)[:c].T + l2 * w
        grad[d * c :] = p.sum(axis=1)
        return loss, grad

    theta0 = (np.concatenate([init[-1][0].ravel(), init[-1][1] + mean @ init[-1][0]]).astype(np.float64)
              if init is not None else np.zeros(d * c + c))
    with one_blas_thread():
        res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": gtol, "maxcor": SOLVER_MEMORY})
    w = res.x[: d * c].reshape(d, c)
    b = res.x[d * c :] - mean @ w
    b -= b.mean()  # softmax ignores a shift of every bias alike: one representative, whatever the start
    info = {"solver": "lbfgs", "l2": float(l2), "iterations": int(res.nit), "evaluations": int(res.nfev),
            "loss": float(res.fun), "grad_max": float(np.abs(res.jac).max()), "converged": bool(res.success)}
    return [(w.astype(np.float32), b.astype(np.float32))], info


def gradient_max(layers: Layers, x: np.ndarray, y: np.ndarray, l2: float, balance: bool = True) -> float:
    """The largest component of the gradient of solve_softmax's objective at a linear head, in
    the full feature space: how far the head is from that problem's minimum (0 there)."""
    (w, b), = layers
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    sw = class_weights(y, w.shape[1], balance).astype(np.float64)
    z = x @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p *= (sw / sw.sum())[:, None]
    return float(max(np.abs(x.T @ p + l2 * w).max(), np.abs(p.sum(axis=0)).max()))


def choose_l2(x: np.ndarray, y: np.ndarray, num_classes: int, grid: tuple[float, ...] = L2_GRID, folds: int = 5,
              balance: bool = True, seed: int = 0) -> tuple[float, list[dict]]:
    """L2 by stratified k-fold cross-validation with the one-standard-error rule: the STRONGEST
    L2 whose mean held-out accuracy is within one standard error of the best (the standard
    guard against picking noise; glmnet's lambda.1se). Returns it and the table."""
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), np.int64)
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    rows = []
    warm: dict[int, Layers] = {}  # strong to weak L2, each fold starts from its previous solution
    for l2 in sorted(grid, reverse=True):
        correct = np.zeros(len(y), bool)
        for k in range(folds):
            held = fold == k
            if held.all() or not held.any():
                continue
            warm[k], _ = solve_softmax(x[~held], y[~held], num_classes, l2, balance, init=warm.get(k), gtol=1e-4,
                                       dtype=np.float32)
            w, b = warm[k][0]
            correct[held] = (np.asarray(x[held], np.float32) @ w + b).argmax(axis=1) == y[held]
        acc = float(correct.mean())
        rows.append({"l2": float(l2), "cv_accuracy": acc, "stderr": float(np.sqrt(acc * (1 - acc) / len(y)))})
    rows.sort(key=lambda r: r["l2"])
    best = max(rows, key=lambda r: r["cv_accuracy"])
    chosen = max((r for r in rows if r["cv_accuracy"] >= best["cv_accuracy"] - best["stderr"]), key=lambda r: r["l2"])
    return chosen["l2"], rows


# Principal directions of the bundle's replay features a device retrain solves in: as accurate
# as 192 on the few-shot scenarios, with fewer products per step; 128 lost new-class accuracy
# (benchmarks/few_shot.py --learner-only --subspace-dim N; figures in README and benchmarks/results).
SUBSPACE_DIM = 160
SHIPPED_DIRECTIONS = 192  # the exporter ships this many (a retrain may ask for up to this many without recomputing)
# At most this many more: the leading directions in which the device's own samples leave that
# subspace (beyond this count a randomised range finder keeps the leading ones). It bounds a
# retrain's cost as the store grows, at no cost in accuracy against 256 (few_shot.py
# --learner-only --ks 50,100 --residual-directions N --force).
RESIDUAL_DIRECTIONS = 64


@dataclass(frozen=True)
class Subspace:
    """An affine subspace of feature space: features are centred on ``mean`` (d,) and
    described by their coordinates along the orthonormal rows of ``basis`` (k, d).

    A linear head ``W = basis.T @ w`` moves the logits of a feature only through its
    coordinates: ``x @ W + b == project(x) @ w + b'`` exactly, for every feature x (the part of x
    outside the subspace is orthogonal to every column of W). So the softmax problem restricted to
    such heads is the same problem (same loss, same L2, as |W| = |w|) on k-dimensional
    coordinates: a device retrain solves it there (``lift`` gives the full head back), and its
    solution is the full problem's when the subspace holds the span of the centred training
    features (the representer theorem). The bundle's replay features' principal directions, plus
    the residual directions of the device's own samples (``extended``), hold nearly all of it.
    """

    mean: np.ndarray
    basis: np.ndarray

    @classmethod
    def principal(cls, x: np.ndarray, k: int = SHIPPED_DIRECTIONS) -> Subspace:
        """The mean of ``x`` and its ``k`` leading principal directions."""
        x = np.asarray(x, np.float32)
        if not len(x):
            raise ConfigError("no features to find principal directions in")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        keep = int(min(k, (s > s[0] * 1e-5).sum())) if len(s) and s[0] > 0 else 0
        return cls(mean.astype(np.float32), np.ascontiguousarray(vt[:keep], np.float32))

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def project(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) @ self.basis.T

    def extended(self, x: np.ndarray, most: int = RESIDUAL_DIRECTIONS) -> Subspace:
        """This subspace plus (up to ``most``) orthonormal directions spanning what of ``x``
        (centred) lies outside it: a few new photos of a class the basis never saw are then
        represented exactly."""
        x = np.asarray(x, np.float32)
        if not len(x) or most <= 0:
            return self
        r = (x - self.mean) - self.project(x) @ self.basis
        if len(r) > most:  # a randomised range finder: the residuals' leading directions
            r = (np.random.default_rng(0).standard_normal((most, len(r))).astype(np.float32) @ r)
        from scipy.linalg import qr

        q, tri = qr(r.T, mode="economic", check_finite=False)
        d = np.abs(np.diag(tri))
        scale = max(float(d.max()) if d.size else 0.0, float(np.linalg.norm(x - self.mean, axis=1).max()))
        new = q[:, d > 1e-4 * scale].T if scale > 0 else q[:, :0].T
        # One more Gram-Schmidt pass against the basis (QR of float32 residuals leaves a little of it).
        new = new - (new @ self.basis.T) @ self.basis
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        return Subspace(self.mean, np.ascontiguousarray(np.concatenate([self.basis, new]), np.float32))

    def restrict(self, layers: Layers) -> Layers:
        """A full (linear) head in coordinates: the nearest head of the subspace (W projected on it)."""
        (w, b), = layers
        return [((self.basis @ w).astype(np.float32), (b + self.mean @ w).astype(np.float32))]

    def lift(self, layers: Layers) -> Layers:
        """A head on coordinates as the same head on full features."""
        (w, b), = layers
        full = self.basis.T @ w
        return [(full.astype(np.float32), (b - self.mean @ full).astype(np.float32))]
