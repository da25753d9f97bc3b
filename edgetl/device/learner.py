"""The device learner: a verified bundle + a sample store + a NumPy (or TFLite) head trainer.

    learner = Learner.open("models/flowers", store="state/flowers.sqlite")
    learner.add(["a.jpg", "b.jpg"], "my_mug")      # features stored durably
    learner.train()                                 # new head version, old one kept
    learner.predict(["c.jpg"], top_k=3)
    learner.rollback(1)

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import preprocess
from ..bundle import Bundle, open_bundle
from ..errors import BundleError, ConfigError, DataError, EdgetlError, StoreError
from ..formats import FORMATS, MODEL_ROLES
from ..head_arrays import head_predict, sum_by_class
from ..head_solver import Subspace, one_blas_thread
from ..labels import check_label, printable, storable
from ..metrics import top_k as top_k_labels
from ..selftest import References, cpu_fingerprint, describe_cpu, verdict
from ..selftest import measure as measure_self_test
from .headtrain import (
    HeadTrainConfig,
    add_classes,
    drop_classes,
    fit_temperature,
    ncm_nearest,
    ncm_predict,
    resolve_optimizer,
    train_head,
    with_temperature,
)
from .store import HeadVersion, SampleStore

log = logging.getLogger("edgetl")


def default_store_path(bundle: Bundle) -> Path:
    """``$EDGETL_HOME/<bundle name>.sqlite`` (default ``~/.local/share/edgetl``)."""
    home = os.environ.get("EDGETL_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "edgetl")
    return Path(home) / f"{bundle.manifest.get('name', 'bundle')}.sqlite"


def _describe(entry: dict) -> str:
    return f"{entry['file']} (--backend {FORMATS[entry['format']].runtime} --precision {entry.get('precision')})"


def pick_backbone(bundle: Bundle, store_path: Path, backend: str | None, precision: str | None,
                  made_with: str | None) -> dict:
    """The bundle's backbone file for this store (``made_with``: the store's backbone, None if new).

    A store's features come from one backbone file; an existing store keeps using the file it
    was made with unless ``backend``/``precision`` ask for another, which is refused with the
    options that open it.
    """
    origin = next((e for e in bundle.entries("backbone") if e["sha256"] == made_with), None)
    if origin is not None and backend is None and precision is None:
        return origin
    entry = bundle.pick("backbone", backend=backend, precision=precision)
    if made_with is not None and entry["sha256"] != made_with:
        if origin is not None:
            raise StoreError(
                f"sample store {store_path} was made with this bundle's {_describe(origin)}, whose features differ "
                f"from {entry['file']}'s; open it with those options, or use another --store for {entry['file']}")
        raise StoreError(
            f"sample store {store_path} holds features of a backbone this bundle does not have "
            f"({made_with[:16]}...); it belongs to another bundle: use another --store")
    return entry


def check_entry(bundle: Bundle, entry: dict, runner) -> dict:
    """One backbone or classifier file against the bundle's self-test references, on this CPU."""
    refs = References(bundle.root / bundle.manifest["self_test"]["file"])
    head = bundle.head(entry) if entry["role"] == "backbone" else None
    measured = measure_self_test(runner, refs, bundle.preprocessing, entry["role"], head)
    ok, reason = verdict(entry, measured)
    return {"file": entry["file"], "role": entry["role"], "runtime": runner.backend, "ok": ok, "reason": reason,
            **measured, "expected": entry.get("self_test"), "cpu": cpu_fingerprint(), "checked": time.time()}


def _first_passing_backbone(bundle: Bundle, entry: dict, runner, threads: int | None):
    """The preferred backbone file if it passes its self-test here, else the next one that does."""
    first = check_entry(bundle, entry, runner)
    if first["ok"]:
        return entry, runner, first
    for other in [e for e in bundle.ranked("backbone") if e is not entry]:
        try:
            r = bundle.open_model(other, threads=threads)
        except EdgetlError:  # its runtime is not installed here
            continue
        result = check_entry(bundle, other, r)
        if result["ok"]:
            log.warning("%s fails its self-test on this CPU (%s); using %s, which passes", entry["file"],
                        first["reason"], other["file"])
            return other, r, result
    return entry, runner, first  # none passes: first_load_check refuses with the first file's numbers


def _every_kth(y: np.ndarray, rows: np.ndarray, every: int, classes=None) -> np.ndarray:
    """Every ``every``-th of the ``rows`` of each class (of ``classes``, default all), in order."""
    back = np.zeros(len(y), bool)
    for c in np.unique(y[rows]) if classes is None else classes:
        back[np.flatnonzero((y == c) & rows)[every - 1 :: every]] = True
    return back


def _held_back(y: np.ndarray, ids: np.ndarray, every: int) -> np.ndarray:
    """Every ``every``-th stored sample of each class (in the order they were added); replay
    features (id -1) always train."""
    return _every_kth(y, ids >= 0, every)


def _replay_held_back(y: np.ndarray, ids: np.ndarray, old_classes: list[int], every: int = 5) -> np.ndarray:
    """Every ``every``-th replay feature (id -1) of each of the bundle's classes."""
    return _every_kth(y, ids < 0, every, old_classes)


BIAS_GRID = tuple(np.arange(0.0, 4.01, 0.25))
GUARD_MIN_PHOTOS = 50  # held-back replay photos needed to refuse a training for forgetting
# auto: nearest class mean while some stored class is not in the head yet, or when it beat the
# head on the last training's held-back photos; the head otherwise.
MODES = ("auto", "head", "ncm")


def _new_class_bias(layers, x: np.ndarray, y: np.ndarray, device_classes: list[int], num_classes: int,
                    budget: float, reference: float) -> dict:
    """The largest bias for the device's classes (on BIAS_GRID) that keeps held-back replay photos
    of the bundle's classes within ``budget`` of ``reference`` (their accuracy under a head of the
    bundle's classes alone). A head trained from a few photos per new class under-predicts them
    (L2 shrinks what little they pull); this gives them what the budget allows, measured on
    photos neither head trained on."""
    logp = np.log(head_predict(x, layers) + 1e-30)
    offset = np.zeros(num_classes)
    offset[device_classes] = 1.0
    without = float((logp.argmax(1) == y).mean())
    chosen, cost = 0.0, reference - without
    for delta in BIAS_GRID[1:]:
        acc = float(((logp + delta * offset).argmax(1) == y).mean())
        if reference - acc > budget + 1e-9:
            break
        chosen, cost = float(delta), reference - acc
    # Too few held-back photos measure a loss too coarsely to refuse a training on it (3 photos:
    # steps of 33 points): the forgetting check then passes, and says it could not judge.
    judged = len(y) >= GUARD_MIN_PHOTOS
    return {"bias": chosen, "budget": budget, "held_back_replay": int(len(y)), "reference_accuracy": reference,
            "cost_without_bias": round(reference - without, 6), "cost": round(cost, 6), "judged": judged,
            "within_budget": not judged or reference - without <= budget + 1e-9}


def _with_bias(layers, bias: dict | None, labels: list[str]):
    """``layers`` with ``bias['bias']`` added to the output biases of ``bias['classes']``."""
    if not bias or not bias["bias"]:
        return layers
    w, b = layers[-1]
    b = b.copy()
    b[[labels.index(n) for n in bias["classes"] if n in labels]] += bias["bias"]
    return [*layers[:-1], (w, b)]


def _without_bias(layers, info: dict, labels: list[str]):
    bias = info.get("new_class_bias")
    if not bias or not bias["bias"]:
        return layers
    return _with_bias(layers, {**bias, "bias": -bias["bias"]}, labels)


def _heldout_report(layers, x: np.ndarray, y: np.ndarray, ids: np.ndarray, labels: list[str]) -> dict:
    """Accuracy and confusion matrix (rows: truth, columns: prediction) of ``layers`` on x, y,
    with the misclassified sample ids."""
    pred = head_predict(x, layers).argmax(1)
    n = len(labels)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (y, pred), 1)
    wrong = [{"id": int(i), "label": labels[t], "predicted": labels[p]}
             for i, t, p in zip(ids, y, pred) if t != p]
    return {"available": True, "labels": list(labels), "samples": int(len(y)),
            "accuracy": float((pred == y).mean()), "confusion": confusion.tolist(), "misclassified": wrong}


def _start_old_classes(layers, reference: dict, old: list[int]):
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
    b[old] = bo - bo.mean() + b[old].mean()  # (softmax ignores a common shift: keep the new units' level)
    return [(w, b)]


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


class Learner:
    def __init__(self, bundle: Bundle, store: SampleStore, backbone_entry: dict, runner, trainer: str = "numpy"):
        self.bundle = bundle
        self.store = store
        self.backbone_entry = backbone_entry
        self.runner = runner
        self.spec = bundle.preprocessing
        if trainer not in ("numpy", "tflite"):
            raise ConfigError(f"trainer must be 'numpy' or 'tflite'; received {trainer!r}")
        self.trainer = trainer
        self._decoder: ThreadPoolExecutor | None = None  # started by the first multi-photo call
        self._centre_value: np.ndarray | None = None
        self._references: dict[str, dict] = {}  # the bundle-only reference fits (see train), by key
        if store.active_version() is None and not store.readonly:
            store.save_head(list(bundle.labels), bundle.head(backbone_entry),
                            {"origin": "bundle", "note": "the workstation head from the bundle"})

    @classmethod
    def open(cls, bundle: str | Path, store: str | Path | None = None, backend: str | None = None,
             precision: str | None = None, threads: int | None = None, trainer: str = "numpy",
             check: bool = True, readonly: bool = False) -> Learner:
        """Open the bundle and its sample store. ``readonly``: for commands that only read
        (predict, history, info, eval, export); they never wait behind a writer. A store that
        does not exist yet (or has no head) is created by a normal open first."""
        b = open_bundle(bundle)
        store_path = Path(store) if store else default_store_path(b)
        made_with = SampleStore.backbone_of(store_path)
        entry = pick_backbone(b, store_path, backend, precision, made_with)
        runner = b.open_model(entry, threads=threads, backend=backend)
        checked = None
        if check and made_with is None and backend is None and precision is None and b.manifest.get("self_test"):
            # A new store may still choose its backbone file: the first, in the bundle's order of
            # preference, that computes on this CPU what the export verified.
            entry, runner, checked = _first_passing_backbone(b, entry, runner, threads)
        readonly = readonly and made_with is not None and checked is None
        s = SampleStore(store_path, b.feature_dim, identity=entry["sha256"], readonly=readonly)
        if readonly and s.active_version() is None:  # an empty store: initialise it once
            s.close()
            s = SampleStore(store_path, b.feature_dim, identity=entry["sha256"])
        try:
            learner = cls(b, s, entry, runner, trainer)
            if checked is not None:
                learner._remember_check(checked)
            if check:
                learner.first_load_check()
        except BaseException:
            s.close()
            raise
        return learner

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None
        self.store.close()

    # -- features ---------------------------------------------------------------------------
    def features(self, images: list[str | Path], ahead: int = 2) -> tuple[np.ndarray, list[str], list[str], list[dict]]:
        feats, digests, kept, errors, _ = self._features(images, ahead)
        return feats, digests, kept, errors

    def _features(self, images: list[str | Path], ahead: int = 2, thumbs: bool = False):
        """Backbone features of the readable images, their digests and names; {file, error} for the others.

        Photos after the first are decoded, resized and turned into the model's exact input
        in a worker thread, up to ``ahead`` photos ahead of the backbone, which runs at batch 1
        in the calling thread (Pillow and the runtimes release the GIL). On a multi-core
        device decoding hides behind inference from the second photo on, and memory stays
        flat however many photos one call gets.
        """
        if ahead < 1:
            raise ConfigError(f"ahead must be at least 1 photo; received {ahead}")
        paths = list(images)
        feats, digests, kept, errors, thumbnails = [], [], [], [], []

        def load(path):  # in the worker thread
            try:
                px, digest = preprocess.load_pixels(path, self.spec.size)
            except DataError as exc:
                return None, None, printable(str(exc)), None
            thumb = preprocess.thumbnail_jpeg(px) if thumbs else None
            return self.runner.prepare(px[None], self.spec), digest, None, thumb

        def consume(path, loaded):
            x, digest, error, thumb = loaded
            if error is not None:
                errors.append({"file": printable(str(path)), "error": error})
                return
            # Batch 1, as on the device: a TFLite interpreter keeps its tensors allocated.
            feats.append(self.runner.run_prepared(x))
            digests.append(digest)
            kept.append(str(path))
            thumbnails.append(thumb)

        if len(paths) == 1:
            consume(paths[0], load(paths[0]))
        elif paths:
            if self._decoder is None:  # one worker for the learner's life: no thread start per call
                self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-decode")
            pool = self._decoder
            first = load(paths[0])  # before the worker starts: the two would contend for the GIL
            pending = deque(pool.submit(load, p) for p in paths[1 : 1 + ahead])
            try:
                consume(paths[0], first)
                for i, path in enumerate(paths[1:], start=1):
                    loaded = pending.popleft().result()
                    if i + ahead < len(paths):
                        pending.append(pool.submit(load, paths[i + ahead]))
                    consume(path, loaded)
            finally:  # on an error, let the worker finish what it holds before the caller goes on
                for f in pending:
                    f.cancel()
                wait(pending)
        if not feats:
            return np.zeros((0, self.bundle.feature_dim), np.float32), [], [], errors, []
        return np.concatenate(feats).astype(np.float32), digests, kept, errors, thumbnails

    # -- the API ----------------------------------------------------------------------------
    def add(self, images: list[str | Path], label: str, dtype: str = "float32", skip_duplicates: bool = True,
            new_class: bool = False, sources: list[str] | None = None, thumbnails: bool = False) -> dict:
        """Extract and store samples of ``label`` (a new label becomes a new class at the next train).

        Unreadable images are reported by name; the others are stored in one transaction.
        ``sources``: the names to record and report for ``images`` (default: their paths), e.g.
        an upload's file name; ``thumbnails``: keep a small JPEG of what the model saw.
        """
        label = check_label(label, "--label").strip()
        known = list(dict.fromkeys(self.labels() + list(self.store.counts())))
        similar = [k for k in known if k != label and k.casefold() == label.casefold()]
        if similar and not new_class:
            raise ConfigError(f"label {label!r} differs from the existing class {similar[0]!r} only in case; "
                              f"use {similar[0]!r}, or pass --new-class to make {label!r} a class of its own")
        images = list(images)
        if sources is not None and len(sources) != len(images):
            raise ConfigError(f"{len(images)} images but {len(sources)} source names")
        rename = dict(zip(map(str, images), sources)) if sources is not None else {}
        feats, digests, kept, errors, thumbs = self._features(images, thumbs=thumbnails)
        for e in errors:
            e["file"] = printable(rename.get(e["file"], e["file"]))
        # a file name that is not UTF-8 is stored with \xNN escapes
        names = [storable(rename.get(k, k)) for k in kept]
        ids = self.store.add(feats, label, names, digests, dtype, skip_duplicates=skip_duplicates,
                             thumbs=thumbs if thumbnails else None)
        stored = [(i, f) for i, f in zip(ids, names) if i is not None]
        return {"label": label, "stored": len(stored), "ids": [i for i, _ in stored], "files": [f for _, f in stored],
                "duplicates": [f for i, f in zip(ids, names) if i is None], "errors": errors}

    def labels(self) -> list[str]:
        return list(self.store.head().labels)

    def _bundle_names(self, head: HeadVersion | None = None) -> list[str]:
        """The bundle's classes as ``head`` (default: the active head) names them. A rename of a
        bundle class travels in each later head version's info (``bundle_names``), so its replay
        features keep training it, and a rollback to an earlier version restores the old name."""
        head = head if head is not None else self.store.head()
        renamed = head.info.get("bundle_names") if head is not None else None
        if not isinstance(renamed, dict):
            renamed = {}
        return [str(renamed.get(b, b)) for b in self.bundle.labels]

    def _carry_names(self, head: HeadVersion, info: dict, rename: tuple[str, str] | None = None) -> dict:
        """``info`` of a new head version made from ``head``, with its bundle-class names (and a rename)."""
        names = dict(zip(self.bundle.labels, self._bundle_names(head)))
        if rename is not None:
            names = {b: (rename[1] if n == rename[0] else n) for b, n in names.items()}
        renamed = {b: n for b, n in names.items() if n != b}
        return {**info, "bundle_names": renamed} if renamed else info

    def _training_parts(self, labels: list[str], names: list[str] | None = None) -> TrainingSet:
        """Replay + stored features of ``labels``, the replay not copied (see TrainingSet);
        ``names``: the bundle's classes as the head trained from calls them (_bundle_names)."""
        index = {name: i for i, name in enumerate(labels)}
        names = self._bundle_names() if names is None else names
        replay = self.bundle.replay(self.backbone_entry)
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

    def _training_set(self, labels: list[str], with_ids: bool = False):
        """Replay + stored features of ``labels``: x, y (class indices), counts, and with
        ``with_ids`` the stored sample ids (for a replay feature: -1 - its row in the replay file)."""
        ts = self._training_parts(labels)
        return (ts.full(), ts.y, ts.counts, ts.ids) if with_ids else (ts.full(), ts.y, ts.counts)

    def train(self, config: HeadTrainConfig | None = None, progress: Callable[[float], None] | None = None,
              holdout_every: int | None = None, force: bool = False) -> dict:
        """Retrain the head on replay + stored samples; store it as a new active version.

        ``progress(fraction)`` is called as training goes (it may raise to abandon the training:
        nothing is saved). ``holdout_every=k``: first fit a head without every k-th stored sample
        of each class (classes with at least k samples) and measure it on those; the figures
        (accuracy, confusion matrix, misclassified sample ids) go into the new version's info
        as ``heldout``. The version itself is then trained on everything.

        With classes learned on the device and the bundle's replay features, every 5th replay
        feature of each bundle class is held back and two heads are fitted without them: one of
        the bundle's classes alone (its accuracy there is kept in the store: it depends on the
        bundle and the settings only), one with the device's. The device's classes get the largest
        bias that keeps the bundle's classes within ``config.old_class_budget`` of the first
        head's accuracy on those photos, and the second head, so calibrated, is the new version
        (with ``holdout_every``, a head fitted on everything). A training whose new classes cost
        more than that even without a bias (forgetting) is saved but not activated, unless ``force``.
        """
        with one_blas_thread():  # (see head_solver.one_blas_thread: the pools otherwise spin against each other)
            return self._train(config, progress, holdout_every, force)

    def _train(self, config: HeadTrainConfig | None, progress: Callable[[float], None] | None,
               holdout_every: int | None, force: bool) -> dict:
        if self.trainer == "tflite":
            from .tflite_trainer import config_for, train_with_tflite

            cfg = config or config_for(self.bundle.pick("trainable_head"))
        else:
            cfg = config or HeadTrainConfig()
        t0 = time.perf_counter()
        with self.store.snapshot():  # the head, the samples and the generation of one committed state
            generation = self.store.generation()
            current = self.store.head()
            labels = list(current.labels)
            new = [name for name in self.store.counts() if name not in labels]
            labels_all = labels + new
            names = self._bundle_names(current)
            ts = self._training_parts(labels_all, names)
        y, counts, ids = ts.y, ts.counts, ts.ids
        if len(y) == 0:
            raise DataError("nothing to train on: no stored samples and no replay features; 'add' some photos first")
        # Start from the active head without the bias an earlier calibration gave its device classes
        # (each training chooses it afresh, so it never accumulates).
        sums = self._class_sums(labels_all, ts, names)  # (no pass over the replay: its sums are cached)
        start_layers = _without_bias(current.layers, current.info, labels)
        new_ids = [labels_all.index(n) for n in new]
        if len(start_layers) == 1:  # the new units start from the features of the stored photos
            layers = add_classes(start_layers, ts.stored, y[ids >= 0], new_ids,
                                 centre=(sums.sum(axis=0) / len(y)).astype(np.float32))
        else:
            layers = add_classes(start_layers, ts.full(), y, new_ids)
        # A class with no samples left (removed, then a rollback to a head that knew it) cannot
        # be learned: it is dropped from the new head, and the result says so.
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

        # The converged solver works in a subspace of feature space that holds (nearly) all the
        # training features' directions: the same problem, 10x fewer numbers (head_solver.Subspace).
        sub = None
        solved = {} if self.trainer == "numpy" and resolve_optimizer(cfg, layers) == "lbfgs" else None
        if solved is not None and cfg.subspace_dim:
            sub, x, space = self._coordinates(ts, cfg.subspace_dim, cfg.residual_directions)
            layers = sub.restrict(layers)
            solved.update(space)
        else:
            x = ts.full()

        def fit(start_layers, xs, ys, lo: float, hi: float):
            def on_epoch(epoch, _layers):
                if progress is not None:
                    progress(lo + (hi - lo) * min(1.0, epoch / max(1, cfg.epochs)))

            if progress is not None:
                progress(lo)
            if self.trainer == "tflite":
                return train_with_tflite(self.bundle, start_layers, xs, ys, cfg, on_epoch=on_epoch)
            return train_head(start_layers, xs, ys, cfg, on_epoch=on_epoch, report=solved)

        device_classes = [c for c, n in enumerate(labels_all) if n not in names]
        old = [c for c in range(len(labels_all)) if c not in device_classes]
        replay_back = _replay_held_back(y, ids, old)
        calibrate = cfg.old_class_budget is not None and bool(device_classes) and bool(old) and replay_back.any()
        back_held = _held_back(y, ids, holdout_every) if holdout_every else None
        keep_part = calibrate and back_held is None  # the calibrated head is the one kept (below)
        phases = 2 * int(calibrate) + int(back_held is not None and back_held.any()) + int(not keep_part)
        step = 1.0 / phases
        start = 0.0
        bias = None
        checks: dict = {}
        if calibrate:
            # What the bundle's classes score on held-back replay photos without the device's
            # classes, then with them: the budget bounds the difference, bias included.
            remap = np.full(len(labels_all), -1, np.int64)
            remap[old] = np.arange(len(old))
            # The reference depends on the bundle and the settings only: measured once, kept in the store.
            key = "reference:" + hashlib.sha256(json.dumps(
                [self.bundle.digest, self.backbone_entry["file"], [labels_all[c] for c in old], self.trainer,
                 {k: v for k, v in asdict(cfg).items() if k != "old_class_budget"}]).encode()).hexdigest()
            doc = self._references.get(key)  # (written once per key: parsed once per process)
            if doc is None:
                cached = self.store.get_meta(key)
                doc = json.loads(cached) if cached else None
            if not isinstance(doc, dict) or "accuracy" not in doc:
                rows_old = ~replay_back & np.isin(y, old)
                part_old, _ = fit(drop_classes(layers, old), x[rows_old], remap[y[rows_old]], start, start + step)
                reference = float((head_predict(x[replay_back], part_old).argmax(1) == remap[y[replay_back]]).mean())
                doc = {"accuracy": reference}
                if len(part_old) == 1:  # the solution too: the next training starts its old classes there
                    # (its rows along the bundle's own directions: the stored photos' ones change)
                    rows = (solved or {}).get("principal", len(part_old[0][0]))
                    doc.update(w=part_old[0][0][:rows].tolist(), b=part_old[0][1].tolist())
                if not self.store.readonly:
                    self.store.set_meta(key, json.dumps(doc))
            self._references[key] = doc
            reference = float(doc["accuracy"])
            start += step
            part, part_losses = fit(_start_old_classes(layers, doc, old) if solved is not None else layers,
                                    x[~replay_back], y[~replay_back], start, start + step)
            start += step
            bias = _new_class_bias(part, x[replay_back], y[replay_back], device_classes, len(labels_all),
                                   cfg.old_class_budget, reference)
            bias["classes"] = [labels_all[c] for c in device_classes]
            checks = self._answer_checks(_with_bias(part, bias, labels_all), x, ts, y, sums, replay_back,
                                         "replay photos of the bundle's classes")
        heldout = None
        if back_held is not None:  # (its checks replace the replay ones: they are the device's own photos)
            if back_held.any():
                part, _ = fit(layers, x[~back_held], y[~back_held], start, start + step)
                start += step
                heldout = _heldout_report(_with_bias(part, bias, labels_all), x[back_held], y[back_held],
                                          ids[back_held], labels_all)
                checks = self._answer_checks(_with_bias(part, bias, labels_all), x, ts, y, sums, back_held,
                                             f"stored photos of each class (one in {holdout_every})")
            else:
                heldout = {"available": False, "reason": f"too few samples to hold any back: a class needs at "
                                                         f"least {holdout_every} stored photos"}
        if keep_part:
            # The head the budget was measured on is the head that is kept: the held-back replay
            # photos (a fifth of the bundle's) are its check, not its training.
            layers, losses = part, part_losses
        else:
            if solved is not None and (calibrate or heldout is not None and heldout.get("available")):
                layers = part  # converged: the same minimum from any start, and this one is near it
            layers, losses = fit(layers, x, y, start, 1.0)
        layers = _with_bias(layers, bias, labels_all)
        probs = head_predict(x, layers)  # in the subspace's coordinates: the same numbers as the lifted head's
        train_acc = float((probs.argmax(1) == y).mean())
        if sub is not None:
            layers = sub.lift(layers)
        info = {"origin": "train", "trainer": self.trainer, "config": asdict(cfg), "new_classes": new,
                "dropped_classes": missing, "num_samples": int(len(x)), **counts,
                "train_accuracy": train_acc, "final_loss": losses[-1], "parent": current.version,
                "seconds": round(time.perf_counter() - t0, 4)}
        info = self._carry_names(current, info)
        if solved:  # the last fit's: iterations, final loss, largest gradient component, converged
            info["solver"] = solved
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
        version = self.store.save_head(labels_all, layers, info, expect_generation=generation, activate=activate)
        if progress is not None:
            progress(1.0)
        return {"version": version, "labels": labels_all, **info, "activated": activate, "losses": losses}

    def _class_sums(self, labels: list[str], ts: TrainingSet, names: list[str]) -> np.ndarray:
        """Each class's sum of the training features of ``ts`` (classes of ``labels``; ``names``
        as for _training_parts): the bundle's cached replay sums plus the stored samples'."""
        sums = np.zeros((len(labels), ts.stored.shape[1]), np.float64)
        if ts.replay is not None:
            cached = self.bundle.replay_class_sums(self.backbone_entry)
            index = {name: i for i, name in enumerate(labels)}
            for b, name in enumerate(names):
                if name in index:
                    sums[index[name]] += cached[0][b]
        return sums + sum_by_class(ts.stored, ts.y[ts.ids >= 0], len(labels))

    def _coordinates(self, ts: TrainingSet, dim: int, residual: int) -> tuple[Subspace, np.ndarray, dict]:
        """The subspace a converged retrain solves in: the replay features' ``dim`` principal
        directions (shipped in the bundle; their coordinates are cached) plus the directions of
        the stored samples outside them (at most ``residual``), and the coordinates of the
        training set there (its rows, replay first). Returns it, the coordinates and its dimensions."""
        cached = self.bundle.replay_subspace(self.backbone_entry, dim)
        base, base_coords = cached if cached is not None else (Subspace.principal(ts.full(), dim), None)
        sub = base.extended(ts.stored, residual)
        n = ts.n_replay
        z = np.empty((len(ts.y), sub.dim), np.float32)
        z[n:] = sub.project(ts.stored)
        if base_coords is not None:
            extra = sub.basis[base.dim :]
            rx = ts.replay_x()  # (the bundle's own array when every replay row is kept: no copy)
            z[:n, : base.dim] = base_coords if ts.replay_rows is None else base_coords[ts.replay_rows]
            z[:n, base.dim :] = rx @ extra.T - sub.mean @ extra.T
        else:
            z[:n] = sub.project(ts.replay_x())
        return sub, z, {"subspace_dim": sub.dim, "principal": base.dim, "from_samples": sub.dim - base.dim}

    def _centre(self) -> np.ndarray | None:
        """The mean feature NCM centres on: the bundle's replay photos' (the exporter ships the
        same mean as the replay file's ``basis_mean``); None without replay features."""
        if self._centre_value is None:  # (from the cached class sums: no pass over the replay)
            sums = self.bundle.replay_class_sums(self.backbone_entry)
            self._centre_value = (sums[0].sum(axis=0) / sums[1].sum()).astype(np.float32) \
                if sums is not None and sums[1].sum() else np.zeros(0)
        return self._centre_value if self._centre_value.size else None

    def _answer_checks(self, head, x: np.ndarray, ts: TrainingSet, y: np.ndarray, sums: np.ndarray,
                       back: np.ndarray, what: str) -> dict:
        """On the held-back rows ``back`` of ``ts`` (``head`` was fitted without them; ``x`` its
        rows in the head's coordinates, ``y`` their classes in the head's order (not ``ts.y``'s
        when a class was dropped), ``sums`` each class's sum of the features): the head's accuracy
        against nearest class mean's (means of the rows not held back), which decides predict's
        ``auto`` mode, and the temperature that calibrates the head's scores."""
        yb = y[back]
        probs = head_predict(x[back], head)
        xb = ts.rows(back)
        num_classes = head[-1][0].shape[1]
        counts = np.bincount(y, minlength=num_classes) - np.bincount(yb, minlength=num_classes)
        rest = sums - sum_by_class(xb, yb, num_classes)  # the held-back rows' share taken out
        present = np.flatnonzero(counts)
        means = (rest[present] / counts[present, None]).astype(np.float32)
        ncm = present[ncm_nearest(xb, means, centre=self._centre())]
        t, before, after = fit_temperature(probs, yb)
        return {"ncm_check": {"held_back": what, "photos": int(back.sum()),
                              "head": float((probs.argmax(1) == yb).mean()), "ncm": float((ncm == yb).mean())},
                "temperature": {"value": round(t, 4), "nll_before": round(before, 4), "nll_after": round(after, 4),
                                "photos": int(back.sum())}}

    def answer_mode(self, mode: str = "auto") -> tuple[str, str | None]:
        """Which of head and NCM answers ``mode``, and why (for ``auto``)."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(map(repr, MODES))}; received {mode!r}")
        if mode != "auto":
            return mode, None
        head = self.store.head()
        untrained = [n for n in self.store.counts() if n not in head.labels]
        if untrained:
            return "ncm", (f"nearest class mean: {', '.join(map(printable, untrained))} not in the head yet "
                           "('train' makes one)")
        check = head.info.get("ncm_check")
        if check and check["ncm"] > check["head"]:
            return "ncm", (f"nearest class mean: it scored {check['ncm']:.3f} against the head's {check['head']:.3f} "
                           f"on {check['photos']} held-back {check['held_back']}")
        return "head", None

    def metrics(self) -> dict:
        """The active head measured on stored samples it was not trained on.

        A trained version carries the figures measured when it was trained (``train`` with
        ``holdout_every``); the bundle's own head is measured now on every stored sample of
        its classes (it never saw them). Other versions have none: the result says why.
        """
        head = self.store.head()
        if "heldout" in head.info:
            return {"version": head.version, **head.info["heldout"]}
        if head.info.get("origin") == "bundle":
            x, labels, ids = self.store.samples(head.labels)
            if len(x) == 0:
                return {"version": head.version, "available": False,
                        "reason": "no stored samples of the bundle's classes to measure its head on"}
            y = np.array([head.labels.index(n) for n in labels], np.int64)
            return {"version": head.version, **_heldout_report(head.layers, x, y, np.array(ids), head.labels)}
        return {"version": head.version, "available": False,
                "reason": f"version {head.version} was made by {head.info.get('origin')!r}, not by a training with "
                          "held-back samples; train to measure one"}

    def remove_sample(self, sample_id: int) -> dict:
        """Delete one stored sample (the head keeps what it learned until the next train)."""
        label = self.store.remove_sample(sample_id)
        if label is None:
            raise DataError(f"no stored sample with id {sample_id}")
        return {"id": int(sample_id), "label": label, "samples": self.store.counts()}

    def rename(self, label: str, new_name: str) -> dict:
        """Give a class another name: its samples and (in a new head version) its output."""
        new_name = check_label(new_name, "new name").strip()
        head = self.store.head()
        counts = self.store.counts()
        if label not in head.labels and label not in counts:
            raise DataError(f"unknown label {label!r}; known: {sorted(set(head.labels) | set(counts))}")
        if new_name == label:
            return {"label": label, "name": new_name, "samples": counts.get(label, 0), "version": head.version}
        taken = [k for k in set(head.labels) | set(counts) if k.casefold() == new_name.casefold() and k != label]
        if taken:
            raise ConfigError(f"a class {taken[0]!r} already exists; pick another name")
        new_head = None
        if label in head.labels:
            names = [new_name if n == label else n for n in head.labels]
            new_head = (names, head.layers, self._carry_names(head, {"origin": "rename", "renamed": [label, new_name],
                                                                     "parent": head.version}, (label, new_name)))
        moved, version = self.store.rename_label(label, new_name, new_head)
        return {"label": label, "name": new_name, "samples": moved, "version": version or head.version}

    def worker(self) -> Learner:
        """The same learner on its own store connection, for another thread (e.g. a training
        job: training reads and writes the store but never runs the backbone). Close it there."""
        s = SampleStore(self.store.path, self.bundle.feature_dim, identity=self.backbone_entry["sha256"])
        worker = Learner(self.bundle, s, self.backbone_entry, self.runner, self.trainer)
        worker._references = self._references  # (shared: each entry is written once)
        return worker

    def predict(self, images: list[str | Path], top_k: int = 3, mode: str = "auto",
                unknown_below: float | None = None) -> dict:
        """Same document as ``edgetl predict --json``. ``mode``: head (the active head; its scores
        temperature-calibrated on the last training's held-back photos), ncm (nearest class mean of
        stored samples and replay, centred features: no training needed) or auto (see
        :meth:`answer_mode`). A photo whose best score is below ``unknown_below`` is answered
        ``label: null, unknown: true`` (its top labels are still listed)."""
        if unknown_below is not None and not 0.0 <= unknown_below <= 1.0:
            raise ConfigError(f"unknown_below must be in [0, 1]; received {unknown_below}")
        used, reason = self.answer_mode(mode)
        feats, _, kept, errors = self.features(list(images))
        labels, probs = self.scores(feats, used)
        preds = []
        tops = top_k_labels(probs, labels, top_k) if len(feats) else []
        by_file = dict(zip(kept, tops))
        err_by_file = {e["file"]: e["error"] for e in errors}
        for img in images:
            key = str(img)
            if key in by_file:
                t = by_file[key]
                unknown = unknown_below is not None and t[0]["score"] < unknown_below
                preds.append({"file": printable(key), "label": None if unknown else t[0]["label"],
                              "score": t[0]["score"], "top": t, **({"unknown": True} if unknown else {})})
            else:
                preds.append({"file": printable(key), "error": err_by_file.get(printable(key), "not processed")})
        out = {"predictions": preds, "mode": used, "head_version": self.store.active_version()}
        if mode == "auto":
            out["mode_reason"] = reason or "the trained head"
        return out

    def scores(self, feats: np.ndarray, mode: str) -> tuple[list[str], np.ndarray]:
        """The labels and the scores of features under ``mode`` 'head' (temperature-calibrated)
        or 'ncm' (centred nearest class mean)."""
        if mode == "head":
            head = self.store.head()
            t = (head.info.get("temperature") or {}).get("value")
            return head.labels, with_temperature(head_predict(feats, head.layers), t) if len(feats) else np.zeros((0, 1))
        labels, means = self.class_means()
        return labels, ncm_predict(feats, means, centre=self._centre()) if len(feats) else np.zeros((0, 1))

    def class_means(self) -> tuple[list[str], np.ndarray]:
        """Mean feature per class: stored samples and, for the bundle's classes, replay features."""
        head = self.store.head()
        labels = list(head.labels) + [n for n in self.store.counts() if n not in head.labels]
        names = self._bundle_names(head)
        ts = self._training_parts(labels, names)  # (the replay's sums are cached: no pass over it per prediction)
        counts = np.bincount(ts.y, minlength=len(labels))
        present = np.flatnonzero(counts)
        if not len(present):
            raise DataError("no samples to compute class means from; 'add' some photos first")
        means = (self._class_sums(labels, ts, names)[present] / counts[present, None]).astype(np.float32)
        return [labels[c] for c in present], means

    def remove(self, label: str) -> dict:
        """Delete the label's samples and stop predicting it (a new head version; rollback undoes it)."""
        head = self.store.head()
        counts = self.store.counts()
        if label not in head.labels and label not in counts:
            raise DataError(f"unknown label {label!r}; known: {sorted(set(head.labels) | set(counts))}")
        new_head = None
        if label in head.labels:
            keep = [i for i, n in enumerate(head.labels) if n != label]
            if not keep:
                raise DataError(f"cannot remove {label!r}: it is the only class")
            new_head = ([head.labels[i] for i in keep], drop_classes(head.layers, keep),
                        self._carry_names(head, {"origin": "remove", "removed": label, "parent": head.version}))
        # The samples and the head go in one transaction: a kill leaves both or neither.
        deleted, version = self.store.remove_label(label, new_head)
        return {"label": label, "samples_deleted": deleted, "version": version or head.version}

    def history(self) -> list[dict]:
        return self.store.history()

    def evaluate(self, data_dir: str | Path, mode: str = "auto") -> dict:
        """Accuracy of the active head (or NCM, or what ``auto`` picks) on a class folder, split
        into the bundle's original classes and the classes learned on the device."""
        from ..data import scan_folder
        from ..metrics import classification_report

        mode, _ = self.answer_mode(mode)
        labels = self.labels() if mode == "head" else self.class_means()[0]
        folder = scan_folder(data_dir, classes=labels)
        if not folder.samples:
            raise DataError(f"{str(data_dir)!r} holds no images of the classes {labels}")
        r = self.predict([s.path for s in folder.samples], top_k=1, mode=mode)
        truth, pred, errors = [], [], []
        for s, p in zip(folder.samples, r["predictions"]):
            if "error" in p:
                errors.append({"file": p["file"], "reason": p["error"]})
                continue
            truth.append(s.label)
            pred.append(labels.index(p["label"]))
        report = classification_report(np.array(truth, np.int64), np.array(pred, np.int64), labels)
        original = set(self._bundle_names())

        def acc(group: set[str]) -> tuple[float | None, int]:
            idx = [i for i, t in enumerate(truth) if labels[t] in group]
            if not idx:
                return None, 0
            return float(np.mean([truth[i] == pred[i] for i in idx])), len(idx)

        report["original_classes"] = dict(zip(("accuracy", "num_images"), acc(original)))
        report["new_classes"] = dict(zip(("accuracy", "num_images"), acc(set(labels) - original)))
        report.update({"mode": mode, "head_version": r["head_version"], "data_dir": str(data_dir),
                       "skipped": errors, "model": f"device head version {r['head_version']} ({mode})"})
        return report

    def export(self, out: str | Path, force: bool = False) -> dict:
        """The active head, labels and replay (bundle's + stored samples) as a new bundle."""
        from .bundle_out import export_personalized

        return export_personalized(self, out, force=force)

    def rollback(self, version: int | None = None) -> dict:
        """Make an earlier head version active (default: the parent of the active one)."""
        if version is None:
            parent = self.store.head().info.get("parent")
            if parent is None:
                raise StoreError("the active head has no parent to roll back to; give a version (see 'history')")
            version = int(parent)
        self.store.set_active(version)
        head = self.store.head()
        return {"version": head.version, "labels": head.labels}

    # -- the bundle's self-test on this CPU -----------------------------------------------------
    def _check_key(self) -> str:
        return f"self_test:{self.bundle.digest}:{self.backbone_entry['file']}:{cpu_fingerprint()['id']}"

    def first_load_check(self) -> dict | None:
        """Once per bundle, backbone file and CPU kind: the backbone file against the bundle's
        references. Cached in the store; a file below the export's thresholds is refused."""
        if not self.bundle.manifest.get("self_test"):
            return None
        cached = self.store.get_meta(self._check_key())
        result = json.loads(cached) if cached else self._remember_check(self.check_file(self.backbone_entry))
        if not result["ok"]:
            others = [e["file"] for e in self.bundle.entries("backbone") if e["file"] != self.backbone_entry["file"]]
            raise BundleError(
                f"{self.backbone_entry['file']} does not compute on this CPU ({describe_cpu(result['cpu'])}) what "
                f"the export verified on {describe_cpu(self.bundle.manifest['self_test']['verified_on'])}: "
                f"{result['reason']}, on the bundle's {result['photos']} reference photos. Pick another backbone "
                f"file with --backend/--precision" + (f" (this bundle also has {', '.join(others)})" if others else "")
                + "; 'edgetl device check' tests every file of the bundle on this CPU")
        return result

    def _remember_check(self, result: dict) -> dict:
        if self.store.readonly:  # a reader does not write; the next writer's open caches it
            return result
        self.store.set_meta(self._check_key(), json.dumps(result))
        self.store.set_meta("self_test:last", json.dumps(result))
        return result

    def check_file(self, entry: dict) -> dict:
        """Run one backbone or classifier file of the bundle on the references, on this CPU."""
        runner = self.runner if entry is self.backbone_entry else self.bundle.open_model(entry, threads=1)
        return check_entry(self.bundle, entry, runner)

    def check(self) -> dict:
        """Every backbone and classifier file of the bundle on this CPU (``edgetl device check``)."""
        if not self.bundle.manifest.get("self_test"):
            raise BundleError(f"bundle {self.bundle.source} carries no self-test references (exported by an older "
                              "edgetl, or with --no-verify); re-export it to check it on this device")
        results = []
        for entry in [e for e in self.bundle.files if e["role"] in MODEL_ROLES]:
            try:
                results.append(self.check_file(entry))
            except EdgetlError as exc:  # e.g. its runtime is not installed here
                results.append({"file": entry["file"], "role": entry["role"], "ok": None, "reason": str(exc)})
        doc = {"bundle": str(self.bundle.source), "cpu": cpu_fingerprint(),
               "verified_on": self.bundle.manifest["self_test"]["verified_on"], "files": results,
               "ok": all(r["ok"] is not False for r in results)}
        mine = next((r for r in results if r["file"] == self.backbone_entry["file"]), None)
        if mine is not None and mine["ok"] is not None:
            self._remember_check(mine)
        return doc

    def info(self) -> dict:
        head = self.store.head()
        replay = self.bundle.replay(self.backbone_entry)
        return {
            "bundle": str(self.bundle.source),
            "bundle_sha256": self.bundle.digest,  # of manifest.json: compare it with the publisher's
            "backbone_file": self.backbone_entry["file"],
            "backbone": self.bundle.backbone_identity,
            "backend": self.runner.backend,
            "precision": self.backbone_entry.get("precision"),
            "input_size": self.spec.size,
            "feature_dim": self.bundle.feature_dim,
            "store": str(self.store.path),
            "head_version": head.version,
            "labels": head.labels,
            "samples": self.store.counts(),
            "replay_features": 0 if replay is None else int(len(replay[1])),
            "trainer": self.trainer,
            "cpu": cpu_fingerprint(),
            "last_check": json.loads(self.store.get_meta("self_test:last") or "null"),
        }
