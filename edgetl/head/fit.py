"""Head training on the device, in NumPy (float32).

The head is a stack of dense layers (softmax regression, or one or more ReLU hidden layers
then softmax; see :mod:`edgetl.head.arrays`). One step on a batch minimises

    loss = sum_i w_i * CE(softmax(f(x_i)), y_i) / sum_i w_i  +  l2/2 * sum ||W||^2

where ``w_i`` are class-balancing weights (``N / (C * n_c)``, or 1). SGD (with optional
momentum) or Adam. Deterministic for a given seed. The phone's trainable TFLite head
(:mod:`edgetl.head.tflite`) implements the same step, so both can be checked against
each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .arrays import Layers, softmax
from .solver import RESIDUAL_DIRECTIONS, SUBSPACE_DIM, class_weights, solve_softmax

# lbfgs: solved to convergence (solve_softmax); auto: lbfgs for a head without hidden layers, else adam
OPTIMIZERS = ("auto", "lbfgs", "adam", "sgd")


@dataclass(frozen=True)
class HeadTrainConfig:
    """Hyper-parameters of on-device head training.

    The default (``optimizer='auto'``, a head without hidden layers) solves the regularised
    softmax problem to convergence with L-BFGS (:func:`edgetl.head.solver.solve_softmax`;
    ``epochs`` caps its iterations), in the subspace of the bundle's replay features' leading
    ``subspace_dim`` principal directions plus the device's own samples' directions (see
    :class:`edgetl.head.solver.Subspace`; 0 solves in the full feature space). A head with hidden
    layers, or ``optimizer='adam'|'sgd'``, descends for ``epochs`` steps of ``batch_size``.
    The L2 was chosen on a tuning split (``benchmarks/personalization_variants.py``).
    """

    epochs: int = 300
    batch_size: int = 4096
    learning_rate: float = 1e-2
    optimizer: str = "auto"  # auto | lbfgs | adam | sgd
    subspace_dim: int = SUBSPACE_DIM  # lbfgs on the device: principal directions solved in (0: all)
    residual_directions: int = RESIDUAL_DIRECTIONS  # at most this many more, from the stored samples
    momentum: float = 0.0  # sgd only
    l2: float = 0.3
    balance: bool = True
    seed: int = 0
    # With classes learned on the device: the most accuracy the bundle's classes may lose on
    # held-back replay photos (against a head of the bundle's classes alone). The new classes get
    # the largest bias within it; a training that loses more even without a bias is not
    # activated. None turns both off.
    old_class_budget: float | None = 0.02

    def check(self) -> None:
        if self.subspace_dim < 0:
            raise ConfigError(f"subspace_dim must be >= 0 (0: the full feature space); received {self.subspace_dim}")
        if self.residual_directions < 0:
            raise ConfigError(f"residual_directions must be >= 0; received {self.residual_directions}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1; received {self.epochs}, {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be {' or '.join(map(repr, OPTIMIZERS))}; received {self.optimizer!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0; received {self.learning_rate}")
        if self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0 (0 turns weight decay off); received {self.l2}")
        if self.old_class_budget is not None and not 0.0 <= self.old_class_budget < 1.0:
            raise ConfigError(f"old_class_budget must be in [0, 1) or None; received {self.old_class_budget}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1); received {self.momentum}")


def resolve_optimizer(cfg: HeadTrainConfig, layers: Layers, soft_targets: bool = False) -> str:
    """The optimizer ``cfg`` means for this head: ``auto`` is lbfgs for a head without hidden
    layers trained on class labels, else adam (hidden layers, or target probabilities to distil)."""
    if cfg.optimizer == "auto":
        return "lbfgs" if len(layers) == 1 and not soft_targets else "adam"
    return cfg.optimizer


def forward(layers: Layers, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Activations of every layer input, and the output probabilities."""
    acts = [x]
    h = x
    for i, (w, b) in enumerate(layers):
        z = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(z, 0.0)
            acts.append(h)
        else:
            return acts, softmax(z)
    raise AssertionError("unreachable")


def loss_and_grads(layers: Layers, x: np.ndarray, y: np.ndarray, sw: np.ndarray, l2: float):
    """``y``: class indices (N,), or target probabilities (N, C) (distillation)."""
    acts, p = forward(layers, x)
    n, c = p.shape
    norm = np.float32(sw.sum())
    if y.ndim == 2:
        target = y.astype(np.float32)
        ce = -(target * np.log(np.maximum(p, 1e-12))).sum(axis=1)
    else:
        target = np.zeros_like(p)
        target[np.arange(n), y] = 1.0
        ce = -np.log(np.maximum(p[np.arange(n), y], 1e-12))
    loss = float((sw * ce).sum() / norm) + 0.5 * l2 * sum(float((w * w).sum()) for w, _ in layers)
    delta = (p - target) * (sw / norm)[:, None]
    grads: list[tuple[np.ndarray, np.ndarray]] = [None] * len(layers)  # type: ignore[list-item]
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        a = acts[i]
        gw = a.T @ delta + np.float32(l2) * w
        gb = delta.sum(axis=0)
        grads[i] = (gw.astype(np.float32), gb.astype(np.float32))
        if i > 0:
            delta = (delta @ w.T) * (acts[i] > 0)
    return loss, grads


class _Optimizer:
    def __init__(self, cfg: HeadTrainConfig, layers: Layers):
        self.cfg = cfg
        self.t = 0
        self.m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in layers]
        self.v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in layers]

    def step(self, layers: Layers, grads) -> Layers:
        cfg = self.cfg
        lr = np.float32(cfg.learning_rate)
        self.t += 1
        out = []
        for i, ((w, b), (gw, gb)) in enumerate(zip(layers, grads)):
            if cfg.optimizer == "sgd":
                if cfg.momentum:
                    mw = np.float32(cfg.momentum) * self.m[i][0] + gw
                    mb = np.float32(cfg.momentum) * self.m[i][1] + gb
                    self.m[i] = (mw, mb)
                    gw, gb = mw, mb
                out.append(((w - lr * gw).astype(np.float32), (b - lr * gb).astype(np.float32)))
            else:
                b1, b2, eps = np.float32(0.9), np.float32(0.999), np.float32(1e-7)
                mw = b1 * self.m[i][0] + (1 - b1) * gw
                mb = b1 * self.m[i][1] + (1 - b1) * gb
                vw = b2 * self.v[i][0] + (1 - b2) * gw * gw
                vb = b2 * self.v[i][1] + (1 - b2) * gb * gb
                self.m[i], self.v[i] = (mw, mb), (vw, vb)
                c1 = np.float32(1 - 0.9**self.t)
                c2 = np.float32(1 - 0.999**self.t)
                w = w - lr * (mw / c1) / (np.sqrt(vw / c2) + eps)
                b = b - lr * (mb / c1) / (np.sqrt(vb / c2) + eps)
                out.append((w.astype(np.float32), b.astype(np.float32)))
        return out


def epoch_orders(n: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The sample order of every epoch (shared with the TFLite trainer for parity checks)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(epochs)]


def train_head(layers: Layers, x: np.ndarray, y: np.ndarray, cfg: HeadTrainConfig,
               on_epoch: Callable[[int, Layers], None] | None = None,
               report: dict | None = None) -> tuple[Layers, list[float]]:
    """Train all layers of the head; returns the new layers and the mean loss per epoch.

    ``y`` holds class indices, or (N, C) target probabilities to distil a teacher's outputs.
    ``on_epoch(epoch, layers)`` is called after every epoch (1-based), e.g. to early-stop.
    With L-BFGS, ``report`` (a dict) receives what the solver did (iterations, final loss,
    largest gradient component, converged).
    """
    cfg.check()
    if resolve_optimizer(cfg, layers, np.asarray(y).ndim == 2) == "lbfgs":
        solved, info = _train_lbfgs(layers, x, y, cfg, on_epoch)
        if report is not None:
            report.update(info)
        return solved, [info["loss"]]
    x = np.asarray(x, np.float32)
    soft = np.asarray(y).ndim == 2
    y = np.asarray(y, np.float32 if soft else np.int64)
    num_classes = layers[-1][0].shape[1]
    if len(x) == 0:
        raise ConfigError("no training samples")
    if soft and y.shape[1] != num_classes:
        raise ConfigError(f"targets have {y.shape[1]} classes; the head has {num_classes} outputs")
    if not soft and y.max() >= num_classes:
        raise ConfigError(f"label {int(y.max())} does not fit a head with {num_classes} outputs")
    sw_all = class_weights(y.argmax(axis=1) if soft else y, num_classes, cfg.balance)
    layers = [(w.astype(np.float32).copy(), b.astype(np.float32).copy()) for w, b in layers]
    opt = _Optimizer(cfg, layers)
    history = []
    for order in epoch_orders(len(x), cfg.epochs, cfg.seed):
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            loss, grads = loss_and_grads(layers, x[idx], y[idx], sw_all[idx], cfg.l2)
            layers = opt.step(layers, grads)
            losses.append(loss)
        history.append(float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(len(history), layers)
    return layers, history


def add_classes(layers: Layers, x: np.ndarray, y: np.ndarray, new_ids: list[int], scale: float = 0.25,
                centre: np.ndarray | None = None) -> Layers:
    """Append output units for new classes, each pointing from the mean (last hidden) activation
    of all of ``x`` (``centre``, when the caller has it: a head without hidden layers) towards
    its class's mean.

    The unit's weights have ``scale`` times the median norm of the existing units, and its bias
    gives it the median of their logits at the overall mean: a start between "never" and "always"
    that a solver leaves in a few steps (a prototype at the full norm starts far from the minimum).
    """
    if not new_ids:
        return layers
    layers = [(w.copy(), b.copy()) for w, b in layers]
    # The last layer's input: the features themselves for a head without hidden layers.
    h = np.asarray(x, np.float32) if len(layers) == 1 else forward(layers, np.asarray(x, np.float32))[0][-1]
    w, b = layers[-1]
    if centre is None or len(layers) != 1:
        centre = h.mean(axis=0)
    norms = np.linalg.norm(w, axis=0)
    size = scale * (float(np.median(norms)) if norms.size and np.median(norms) > 0 else 1.0)
    level = float(np.median(centre @ w + b)) if b.size else 0.0
    cols, biases = [], []
    for c in new_ids:
        direction = h[y == c].mean(axis=0) - centre if (y == c).any() else np.zeros(h.shape[1], np.float32)
        n = float(np.linalg.norm(direction))
        col = direction / n * size if n > 0 else direction
        cols.append(col)
        biases.append(level - float(centre @ col))
    w = np.concatenate([w, np.stack(cols, axis=1).astype(np.float32)], axis=1)
    b = np.concatenate([b, np.array(biases, np.float32)])
    layers[-1] = (w.astype(np.float32), b.astype(np.float32))
    return layers


def drop_classes(layers: Layers, keep: list[int]) -> Layers:
    w, b = layers[-1]
    return [*layers[:-1], (w[:, keep].copy(), b[keep].copy())]


def _train_lbfgs(layers: Layers, x, y, cfg: HeadTrainConfig, on_epoch) -> tuple[Layers, dict]:
    """train_head's ``optimizer='lbfgs'``: the same problem solved to convergence, from ``layers``
    (``epochs`` caps the iterations; batch size, learning rate and seed do not apply)."""
    if len(layers) != 1:
        raise ConfigError(f"optimizer 'lbfgs' solves heads without hidden layers; this head has {len(layers) - 1}")
    if np.asarray(y).ndim != 1:
        raise ConfigError("optimizer 'lbfgs' takes class labels, not target probabilities")
    y = np.asarray(y, np.int64)
    num_classes = layers[-1][0].shape[1]
    if len(y) and y.max() >= num_classes:
        raise ConfigError(f"label {int(y.max())} does not fit a head with {num_classes} outputs")
    solved, info = solve_softmax(x, y, num_classes, cfg.l2, cfg.balance, init=layers, max_iter=cfg.epochs,
                                 dtype=np.float32)
    if on_epoch is not None:
        on_epoch(1, solved)
    return solved, info
