"""Retraining the head on the device: the bundle's replay features plus the stored photos.

A retrain solves the converged head in a subspace of feature space (the replay's principal
directions plus the stored photos' own ones), checks it on held-back photos (the bundle's
replay for forgetting, the device's own photos for accuracy), calibrates it (a bias for the
device's classes within the forgetting budget, a temperature for its scores) and saves it as a
new head version, activated unless it forgets too much.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..bundle import Bundle
from ..errors import DataError
from ..head.arrays import Layers, head_predict, sum_by_class
from ..head.calibration import fit_temperature, new_class_bias, with_bias, without_bias
from ..head.fit import HeadTrainConfig, add_classes, drop_classes, resolve_optimizer, train_head
from ..head.ncm import ncm_nearest
from ..head.solver import Subspace, one_blas_thread
from ..head.tflite import config_for, train_with_tflite
from ..metrics import wilson_interval
from .store import HeadVersion, SampleStore

Progress = Callable[[float], None]
REPLAY_HELD_BACK_EVERY = 5  # every 5th replay photo of each bundle class checks a training for forgetting


def every_kth(y: np.ndarray, rows: np.ndarray, every: int, classes=None) -> np.ndarray:
    """Every ``every``-th of the ``rows`` of each class (of ``classes``, default all), in order."""
    back = np.zeros(len(y), bool)
    for c in np.unique(y[rows]) if classes is None else classes:
        back[np.flatnonzero((y == c) & rows)[every - 1 :: every]] = True
    return back


def held_back(y: np.ndarray, ids: np.ndarray, every: int) -> np.ndarray:
    """Every ``every``-th stored sample of each class (in the order they were added); replay
    features (id -1) always train."""
    return every_kth(y, ids >= 0, every)


def replay_held_back(y: np.ndarray, ids: np.ndarray, old_classes: list[int],
                     every: int = REPLAY_HELD_BACK_EVERY) -> np.ndarray:
    """Every ``every``-th replay feature (id -1) of each of the bundle's classes."""
    return every_kth(y, ids < 0, every, old_classes)


def heldout_report(layers: Layers, x: np.ndarray, y: np.ndarray, ids: np.ndarray, labels: list[str]) -> dict:
    """Accuracy and confusion matrix (rows: truth, columns: prediction) of ``layers`` on x, y,
    with the misclassified sample ids."""
    pred = head_predict(x, layers).argmax(1)
    n = len(labels)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (y, pred), 1)
    wrong = [{"id": int(i), "label": labels[t], "predicted": labels[p]}
             for i, t, p in zip(ids, y, pred) if t != p]
    low, high = wilson_interval(int((pred == y).sum()), len(y))
    return {"available": True, "labels": list(labels), "samples": int(len(y)),
            "accuracy": float((pred == y).mean()), "interval_95": [round(low, 4), round(high, 4)],
            "confusion": confusion.tolist(), "misclassified": wrong}


def start_old_classes(layers: Layers, reference: dict, old: list[int]) -> Layers:
    """``layers`` with the bundle's classes' units replaced by the reference head's (the
    solution without the device's classes, along the same leading coordinates; the rows beyond
    them, the stored photos' directions, start at 0): a converged fit then starts next to its
    minimum."""
    if len(layers) != 1 or "w" not in reference:
        return layers
    w, b = layers[0]
    wo, bo = np.asarray(reference["w"], np.float32), np.asarray(reference["b"], np.float32)
    if wo.ndim != 2 or wo.shape[0] > w.shape[0] or wo.shape[1] != len(old) or bo.shape != (len(old),):
        return layers
    w, b = w.copy(), b.copy()
    w[:, old] = 0.0
    w[: wo.shape[0], old] = wo
    b[old] = bo - bo.mean() + b[old].mean()  # softmax ignores a common shift: keep the new units' level
    return [(w, b)]


def bundle_names(bundle: Bundle, head: HeadVersion | None) -> list[str]:
    """The bundle's classes as ``head`` names them. A rename of a bundle class travels in each
    later head version's info (``bundle_names``), so its replay features keep training it, and a
    rollback to an earlier version restores the old name."""
    renamed = head.info.get("bundle_names") if head is not None else None
    if not isinstance(renamed, dict):
        renamed = {}
    return [str(renamed.get(b, b)) for b in bundle.labels]


def carry_names(bundle: Bundle, head: HeadVersion, info: dict, rename: tuple[str, str] | None = None) -> dict:
    """``info`` of a new head version made from ``head``, with its bundle-class names (and a rename)."""
    names = dict(zip(bundle.labels, bundle_names(bundle, head)))
    if rename is not None:
        names = {b: (rename[1] if n == rename[0] else n) for b, n in names.items()}
    renamed = {b: n for b, n in names.items() if n != b}
    return {**info, "bundle_names": renamed} if renamed else info


@dataclass(frozen=True)
class TrainingSet:
    """The features a retrain learns from, replay rows first, without copying the replay: the
    bundle's read-only ``replay`` array (None without one) and the rows of it kept
    (``replay_rows``; None: all of them), then the ``stored`` samples' features. ``y``: class
    indices; ``ids``: stored sample ids, -1 - row for a replay feature."""

    replay: np.ndarray | None
    replay_rows: np.ndarray | None
    stored: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    counts: dict

    @property
    def n_replay(self) -> int:
        return int(self.counts["replay"])

    def replay_x(self) -> np.ndarray:
        if self.replay is None:
            return self.stored[:0]
        return self.replay if self.replay_rows is None else self.replay[self.replay_rows]

    def full(self) -> np.ndarray:
        """Every row as one array (a copy of the replay)."""
        return np.concatenate([self.replay_x(), self.stored]).astype(np.float32, copy=False)

    def rows(self, mask: np.ndarray) -> np.ndarray:
        """The features of the rows where ``mask`` (over all rows) is true."""
        n = self.n_replay
        picked = np.flatnonzero(mask[:n])
        if self.replay_rows is not None:
            picked = self.replay_rows[picked]
        parts = [self.replay[picked]] if self.replay is not None else []
        return np.concatenate([*parts, self.stored[mask[n:]]]).astype(np.float32, copy=False)


@dataclass
class Problem:
    """One retrain's data, snapshotted from the store: the classes (the head's, then new ones),
    the training set, each class's feature sum, and the start head in the solver's coordinates
    (``x``: the training rows there; ``sub``: the subspace, None in the full feature space)."""

    generation: int
    current: HeadVersion
    labels: list[str]
    new: list[str]
    missing: list[str]
    names: list[str]
    ts: TrainingSet
    y: np.ndarray
    sums: np.ndarray
    layers: Layers
    x: np.ndarray
    sub: Subspace | None
    solved: dict | None  # what the converged solver reports (None: not the converged solver)


class _Phases:
    """Progress over the fits of one retrain, each an equal share."""

    def __init__(self, progress: Progress | None, count: int):
        self.progress, self.step, self.at = progress, 1.0 / count, 0.0

    def next(self, last: bool = False) -> tuple[float, float]:
        lo, hi = self.at, 1.0 if last else self.at + self.step
        self.at = hi
        return lo, hi


class Retrainer:
    """Retrains one store's head with its bundle's replay features; ``trainer``: ``numpy`` (the
    converged solver, or Adam/SGD) or ``tflite`` (the bundle's trainable TFLite head)."""

    def __init__(self, bundle: Bundle, entry: dict, store: SampleStore, trainer: str, references: dict):
        self.bundle, self.entry, self.store, self.trainer = bundle, entry, store, trainer
        self.references = references  # the bundle-only reference fits, by key (shared between workers)
        self._centre_value: np.ndarray | None = None

    # -- the data ------------------------------------------------------------------------------
    def training_set(self, labels: list[str], names: list[str] | None = None) -> TrainingSet:
        """Replay + stored features of ``labels``, the replay not copied (see TrainingSet);
        ``names``: the bundle's classes as the head trained from calls them (:func:`bundle_names`)."""
        index = {name: i for i, name in enumerate(labels)}
        names = bundle_names(self.bundle, self.store.head()) if names is None else names
        replay = self.bundle.replay(self.entry)
        rx, rows, parts_y = None, None, []
        if replay is not None:
            rx, ry = replay
            to_index = np.array([index.get(name, -1) for name in names], np.int64)[ry]
            kept = np.flatnonzero(to_index >= 0)
            rows = None if len(kept) == len(rx) else kept
            parts_y.append(to_index[kept])
        else:
            kept = np.zeros(0, np.int64)
        sx, slabels, sids = self.store.samples()
        keep = [i for i, n in enumerate(slabels) if n in index]
        parts_y.append(np.array([index[slabels[i]] for i in keep], np.int64))
        stored = np.asarray(sx[keep], np.float32).reshape(len(keep), self.bundle.feature_dim)
        ids = np.concatenate([-1 - kept, np.array([sids[i] for i in keep], np.int64)])
        return TrainingSet(rx, rows, stored, np.concatenate(parts_y), ids,
                           {"replay": int(len(kept)), "stored": len(keep)})

    def class_sums(self, labels: list[str], ts: TrainingSet, names: list[str]) -> np.ndarray:
        """Each class's sum of the training features of ``ts``: the bundle's cached replay sums
        plus the stored samples'."""
        sums = np.zeros((len(labels), ts.stored.shape[1]), np.float64)
        if ts.replay is not None:
            cached = self.bundle.replay_class_sums(self.entry)
            index = {name: i for i, name in enumerate(labels)}
            for b, name in enumerate(names):
                if name in index:
                    sums[index[name]] += cached[0][b]
        return sums + sum_by_class(ts.stored, ts.y[ts.ids >= 0], len(labels))

    def centre(self) -> np.ndarray | None:
        """The mean feature NCM centres on: the bundle's replay photos' (the exporter ships the
        same mean as the replay file's ``basis_mean``); None without replay features."""
        if self._centre_value is None:
            sums = self.bundle.replay_class_sums(self.entry)
            self._centre_value = (sums[0].sum(axis=0) / sums[1].sum()).astype(np.float32) \
                if sums is not None and sums[1].sum() else np.zeros(0)
        return self._centre_value if self._centre_value.size else None

    def coordinates(self, ts: TrainingSet, dim: int, residual: int) -> tuple[Subspace, np.ndarray, dict]:
        """The subspace a converged retrain solves in: the replay features' ``dim`` principal
        directions (shipped in the bundle; their coordinates are cached) plus the directions of
        the stored samples outside them (at most ``residual``), and the coordinates of the
        training set there (its rows, replay first). Returns it, the coordinates and its dimensions."""
        cached = self.bundle.replay_subspace(self.entry, dim)
        base, base_coords = cached if cached is not None else (Subspace.principal(ts.full(), dim), None)
        sub = base.extended(ts.stored, residual)
        n = ts.n_replay
        z = np.empty((len(ts.y), sub.dim), np.float32)
        z[n:] = sub.project(ts.stored)
        if base_coords is not None:
            extra = sub.basis[base.dim :]
            z[:n, : base.dim] = base_coords if ts.replay_rows is None else base_coords[ts.replay_rows]
            z[:n, base.dim :] = ts.replay_x() @ extra.T - sub.mean @ extra.T
        else:
            z[:n] = sub.project(ts.replay_x())
        return sub, z, {"subspace_dim": sub.dim, "principal": base.dim, "from_samples": sub.dim - base.dim}

    # -- one retrain -----------------------------------------------------------------------------
    def default_config(self) -> HeadTrainConfig:
        if self.trainer == "tflite":

            return config_for(self.bundle.pick("trainable_head"))
        return HeadTrainConfig()

    def train(self, config: HeadTrainConfig | None = None, progress: Progress | None = None,
              holdout_every: int | None = None, force: bool = False) -> dict:
        """See :meth:`edgetl.device.Learner.train`."""
        with one_blas_thread():  # NumPy's and SciPy's BLAS pools otherwise spin against each other
            cfg = config or self.default_config()
            t0 = time.perf_counter()
            p = self.problem(cfg)
            layers, losses, bias, checks, heldout = self._fits(p, cfg, progress, holdout_every)
            return self._save(p, cfg, layers, losses, bias, checks, heldout, force, t0, progress)

    def problem(self, cfg: HeadTrainConfig) -> Problem:
        """The head, the samples and the generation of one committed state, and the start head:
        the active one without its device classes' bias (chosen afresh by each training, so it
        never accumulates), with units for new classes, without classes that have no samples left."""
        with self.store.snapshot():
            generation = self.store.generation()
            current = self.store.head()
            labels = list(current.labels)
            new = [name for name in self.store.counts() if name not in labels]
            labels_all = labels + new
            names = bundle_names(self.bundle, current)
            ts = self.training_set(labels_all, names)
        y, ids = ts.y, ts.ids
        if len(y) == 0:
            raise DataError("nothing to train on: no stored samples and no replay features; 'add' some photos first")
        sums = self.class_sums(labels_all, ts, names)
        start = without_bias(current.layers, current.info, labels)
        new_ids = [labels_all.index(n) for n in new]
        if len(start) == 1:  # the new units start from the features of the stored photos
            layers = add_classes(start, ts.stored, y[ids >= 0], new_ids,
                                 centre=(sums.sum(axis=0) / len(y)).astype(np.float32))
        else:
            layers = add_classes(start, ts.full(), y, new_ids)
        # A class with no samples left (removed, then a rollback to a head that knew it) cannot be
        # learned: it is dropped from the new head, and the result says so.
        missing = [labels_all[c] for c in range(len(labels_all)) if not (y == c).any()]
        if missing:
            keep = [c for c in range(len(labels_all)) if labels_all[c] not in missing]
            if not keep:
                raise DataError(f"no class has samples to train on ({', '.join(missing)}); 'add' some photos first")
            remap = np.full(len(labels_all), -1, np.int64)
            remap[keep] = np.arange(len(keep))
            layers, y, sums = drop_classes(layers, keep), remap[y], sums[keep]
            labels_all = [labels_all[c] for c in keep]
            new = [n for n in new if n not in missing]
        sub, solved = None, ({} if self.trainer == "numpy" and resolve_optimizer(cfg, layers) == "lbfgs" else None)
        if solved is not None and cfg.subspace_dim:
            sub, x, space = self.coordinates(ts, cfg.subspace_dim, cfg.residual_directions)
            layers = sub.restrict(layers)
            solved.update(space)
        else:
            x = ts.full()
        return Problem(generation, current, labels_all, new, missing, names, ts, y, sums, layers, x, sub, solved)

    def fit(self, p: Problem, cfg: HeadTrainConfig, start: Layers, xs: np.ndarray, ys: np.ndarray,
            progress: Progress | None, span: tuple[float, float]) -> tuple[Layers, list[float]]:
        lo, hi = span

        def on_epoch(epoch, _layers):
            if progress is not None:
                progress(lo + (hi - lo) * min(1.0, epoch / max(1, cfg.epochs)))

        if progress is not None:
            progress(lo)
        if self.trainer == "tflite":

            entry = self.bundle.pick("trainable_head")
            return train_with_tflite(self.bundle.path(entry), entry, start, xs, ys, cfg, on_epoch=on_epoch)
        return train_head(start, xs, ys, cfg, on_epoch=on_epoch, report=p.solved)

    def _fits(self, p: Problem, cfg: HeadTrainConfig, progress: Progress | None, holdout_every: int | None):
        """The fits of one retrain: with device classes and replay, two on the replay not held
        back (the bundle's classes alone: the reference; then all classes: the head calibrated
        and checked); with ``holdout_every``, one without the device's held-back photos (their
        figures); then the head kept. Returns it, its losses, the bias, the checks and the figures."""
        x, y = p.x, p.y
        device_classes = [c for c, n in enumerate(p.labels) if n not in p.names]
        old = [c for c in range(len(p.labels)) if c not in device_classes]
        replay_back = replay_held_back(y, p.ts.ids, old)
        calibrate = cfg.old_class_budget is not None and bool(device_classes) and bool(old) and replay_back.any()
        back_held = held_back(y, p.ts.ids, holdout_every) if holdout_every else None
        keep_part = calibrate and back_held is None  # the calibrated head is the one kept
        phases = _Phases(progress, 2 * int(calibrate) + int(back_held is not None and back_held.any())
                         + int(not keep_part))
        part = part_losses = bias = heldout = None
        checks: dict = {}
        if calibrate:
            reference = self.reference(p, cfg, old, replay_back, progress, phases.next())
            start = start_old_classes(p.layers, reference, old) if p.solved is not None else p.layers
            part, part_losses = self.fit(p, cfg, start, x[~replay_back], y[~replay_back], progress, phases.next())
            bias = new_class_bias(part, x[replay_back], y[replay_back], device_classes, len(p.labels),
                                  cfg.old_class_budget, float(reference["accuracy"]))
            bias["classes"] = [p.labels[c] for c in device_classes]
            checks = self.answer_checks(p, with_bias(part, bias, p.labels), replay_back,
                                        "replay photos of the bundle's classes")
        if back_held is not None:  # its checks replace the replay ones: they are the device's own photos
            if back_held.any():
                part, _ = self.fit(p, cfg, p.layers, x[~back_held], y[~back_held], progress, phases.next())
                biased = with_bias(part, bias, p.labels)
                heldout = heldout_report(biased, x[back_held], y[back_held], p.ts.ids[back_held], p.labels)
                checks = self.answer_checks(p, biased, back_held,
                                            f"stored photos of each class (one in {holdout_every})")
            else:
                heldout = {"available": False, "reason": f"too few samples to hold any back: a class needs at "
                                                         f"least {holdout_every} stored photos"}
        if keep_part:
            # The head the budget was measured on is the one kept: the held-back replay photos
            # (a fifth of the bundle's) are its check, not its training.
            layers, losses = part, part_losses
        else:
            layers = p.layers
            if p.solved is not None and (calibrate or heldout is not None and heldout.get("available")):
                layers = part  # converged: the same minimum from any start, and this one is near it
            layers, losses = self.fit(p, cfg, layers, x, y, progress, phases.next(last=True))
        return with_bias(layers, bias, p.labels), losses, bias, checks, heldout

    def reference(self, p: Problem, cfg: HeadTrainConfig, old: list[int], replay_back: np.ndarray,
                  progress: Progress | None, span: tuple[float, float]) -> dict:
        """What the bundle's classes score on held-back replay photos under a head of the bundle's
        classes alone (and, for a converged head, that head's solution: the next training starts
        its old classes there). It depends on the bundle and the settings only: kept in the store."""
        key = "reference:" + hashlib.sha256(json.dumps(
            [self.bundle.digest, self.entry["file"], [p.labels[c] for c in old], self.trainer,
             {k: v for k, v in asdict(cfg).items() if k != "old_class_budget"}]).encode()).hexdigest()
        doc = self.references.get(key)
        if doc is None:
            cached = self.store.get_meta(key)
            doc = json.loads(cached) if cached else None
        if not isinstance(doc, dict) or "accuracy" not in doc:
            remap = np.full(len(p.labels), -1, np.int64)
            remap[old] = np.arange(len(old))
            rows_old = ~replay_back & np.isin(p.y, old)
            part_old, _ = self.fit(p, cfg, drop_classes(p.layers, old), p.x[rows_old], remap[p.y[rows_old]],
                                   progress, span)
            pred = head_predict(p.x[replay_back], part_old).argmax(1)
            doc = {"accuracy": float((pred == remap[p.y[replay_back]]).mean())}
            if len(part_old) == 1:  # its rows along the bundle's own directions: the stored photos' ones change
                rows = (p.solved or {}).get("principal", len(part_old[0][0]))
                doc.update(w=part_old[0][0][:rows].tolist(), b=part_old[0][1].tolist())
            if not self.store.readonly:
                self.store.set_meta(key, json.dumps(doc))
        self.references[key] = doc
        return doc

    def answer_checks(self, p: Problem, head: Layers, back: np.ndarray, what: str) -> dict:
        """On the held-back rows ``back`` (``head`` was fitted without them): the head's accuracy
        against nearest class mean's (means of the rows not held back), which decides predict's
        ``auto`` mode, and the temperature that calibrates the head's scores."""
        yb = p.y[back]
        probs = head_predict(p.x[back], head)
        xb = p.ts.rows(back)
        num_classes = head[-1][0].shape[1]
        counts = np.bincount(p.y, minlength=num_classes) - np.bincount(yb, minlength=num_classes)
        rest = p.sums - sum_by_class(xb, yb, num_classes)  # the held-back rows' share taken out
        present = np.flatnonzero(counts)
        means = (rest[present] / counts[present, None]).astype(np.float32)
        ncm = present[ncm_nearest(xb, means, centre=self.centre())]
        t, before, after = fit_temperature(probs, yb)
        return {"ncm_check": {"held_back": what, "photos": int(back.sum()),
                              "head": float((probs.argmax(1) == yb).mean()), "ncm": float((ncm == yb).mean())},
                "temperature": {"value": round(t, 4), "nll_before": round(before, 4), "nll_after": round(after, 4),
                                "photos": int(back.sum())}}

    def _save(self, p: Problem, cfg: HeadTrainConfig, layers: Layers, losses: list[float], bias: dict | None,
              checks: dict, heldout: dict | None, force: bool, t0: float, progress: Progress | None) -> dict:
        probs = head_predict(p.x, layers)  # in the subspace's coordinates: the same numbers as the lifted head's
        train_acc = float((probs.argmax(1) == p.y).mean())
        if p.sub is not None:
            layers = p.sub.lift(layers)
        info = {"origin": "train", "trainer": self.trainer, "config": asdict(cfg), "new_classes": p.new,
                "dropped_classes": p.missing, "num_samples": int(len(p.x)), **p.ts.counts,
                "train_accuracy": train_acc, "final_loss": losses[-1], "parent": p.current.version,
                "seconds": round(time.perf_counter() - t0, 4)}
        info = carry_names(self.bundle, p.current, info)
        if p.solved:  # the last fit's: iterations, final loss, largest gradient component, converged
            info["solver"] = p.solved
        info.update(checks)
        if heldout is not None:
            info["heldout"] = heldout
        activate = True
        if bias is not None:
            info["new_class_bias"] = bias
            if not bias["within_budget"] and not force:
                activate = False
                info["candidate"] = (
                    f"not activated: with {', '.join(bias['classes'])} the bundle's classes score "
                    f"{100 * bias['cost_without_bias']:.1f} points less on {bias['held_back_replay']} held-back replay "
                    f"photos, more than the {100 * bias['budget']:g} allowed (--old-class-budget); the head is kept as "
                    "a candidate: 'train --force' activates such a head, 'rollback VERSION' this one")
        version = self.store.save_head(p.labels, layers, info, expect_generation=p.generation, activate=activate)
        if progress is not None:
            progress(1.0)
        return {"version": version, "labels": p.labels, **info, "activated": activate, "losses": losses}
