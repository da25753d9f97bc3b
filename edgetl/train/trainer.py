"""Stage 1 (head on cached features), optional augmentation, stage 2 (fine-tuning)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import __version__, preprocess
from ..data import ImageFolder, scan_folder, split_folder
from ..errors import ConfigError, DataError
from ..fileio import atomic_write_json, atomic_write_text, commit_dir, make_staging_dir
from ..head.arrays import head_predict, save_head
from ..head.solver import balanced_class_weights, choose_l2, solve_softmax
from ..metrics import classification_report
from . import backend, quick
from .backbones import build_backbone, weights_digest
from .config import TrainConfig
from .fast_features import FeatureEngine
from .features import FeatureCache, Features, extract_features
from .head import (
    augmentation_layers,
    build_classifier,
    build_head,
    head_layers,
    make_image_dataset,
    set_head_layers,
)
from .run import check_run_target

log = logging.getLogger("edgetl")
Progress = Callable[..., None]  # (stage, done, total, note=None)


def class_weight_map(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """Keras' class_weight: the solvers' balanced weights (edgetl.head.solver), or None."""

    if mode == "none":
        return None
    return {i: float(w) for i, w in enumerate(balanced_class_weights(labels, num_classes))}


def _progress_callback(progress: Progress | None, stage: str, total: int):
    import keras

    class _CB(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if progress:
                progress(stage, epoch + 1, total)

    return _CB()


def _history_rows(history, stage: str, offset: int) -> list[dict]:
    h = history.history
    n = len(next(iter(h.values()))) if h else 0
    rows = []
    for i in range(n):
        row = {"epoch": offset + i + 1, "stage": stage}
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if k in h:
                row[k] = float(h[k][i])
        rows.append(row)
    return rows


def _stopping_summary(history, monitor: str, epochs: int, patience: int) -> dict:
    """How head training ended: epochs run, the epoch whose weights were kept, early stop or not."""
    values = history.history.get(monitor) or [0.0]
    run = len(values)
    return {"epochs": epochs, "epochs_run": run, "best_epoch": int(np.argmin(values)) + 1,
            "stopped_early": run < epochs, "monitor": monitor, "patience": patience}


def _loss(label_smoothing: float):
    import keras

    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def train(cfg: TrainConfig, progress: Progress | None = None, force: bool = False) -> dict:
    """Train a classifier and write the run folder. Returns the run's summary (JSON-ready).

    The run is built in a hidden staging folder beside ``cfg.out_dir`` and moved into place in
    one step when complete: a failed or killed run leaves nothing at ``out_dir``, and a reader
    never sees a mix of two runs. An existing run is replaced only with ``force``.
    """
    cfg.check()
    target = Path(cfg.out_dir)
    check_run_target(target, force)
    staging = make_staging_dir(target)
    try:
        rec = quick.find(cfg)
        summary = _train_quick(cfg, target, staging, progress, rec) if rec else _train(cfg, target, staging, progress)
        commit_dir(staging, target, replace=target.exists())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _solve_head(cfg: TrainConfig, tr: Features, va: Features, num_classes: int, progress: Progress | None):
    """The linear head by the converged solver both sides share (edgetl.head.solver).

    L2 by stratified 5-fold cross-validation on the training split (unless given), the head
    solved on the training split (the validation figures are measured with it), then, with
    ``final_fit='all'`` and no fine-tuning to follow, solved again on training + validation
    photos: the head the run keeps. Returns (final layers, the layers the validation figures
    come from or None, the head_training summary, the history row).
    """

    balance = cfg.class_weights == "balanced"
    steps = 3
    if progress:
        progress("head", 0, steps)
    if cfg.l2 is None:
        l2, table = choose_l2(tr.features, tr.labels, num_classes, balance=balance, seed=cfg.seed)
        chosen_by = "5-fold cross-validation on the training split (one-standard-error rule)"
    else:
        l2, table, chosen_by = cfg.l2, None, "given"
    if progress:
        progress("head", 1, steps)
    layers, info = solve_softmax(tr.features, tr.labels, num_classes, l2, balance)
    if progress:
        progress("head", 2, steps)

    def loss_acc(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        p = head_predict(x, layers)
        return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))), float((p.argmax(1) == y).mean())

    row = {"epoch": 1, "stage": "head"}
    row["loss"], row["accuracy"] = loss_acc(tr.features, tr.labels)
    if len(va.labels):
        row["val_loss"], row["val_accuracy"] = loss_acc(va.features, va.labels)
    summary = {"solver": "lbfgs", "l2": float(l2), "l2_chosen_by": chosen_by, "cv": table,
               "iterations": info["iterations"], "loss": info["loss"], "grad_max": info["grad_max"],
               "converged": info["converged"], "fit_on": "train", "num_fit": int(len(tr.labels))}
    final, val_layers = layers, None
    if cfg.final_fit == "all" and len(va.labels):
        x = np.concatenate([tr.features, va.features])
        y = np.concatenate([tr.labels, va.labels])
        final, info_all = solve_softmax(x, y, num_classes, l2, balance, init=layers)
        val_layers = layers
        summary.update({"fit_on": "train+val", "num_fit": int(len(y)), "iterations_all": info_all["iterations"],
                        "grad_max": info_all["grad_max"], "converged": info["converged"] and info_all["converged"]})
    if progress:
        progress("head", steps, steps)
    return final, val_layers, summary, row


def _seed_cache(old: Path, new: Path) -> None:
    """Reuse an earlier run's feature cache: hard links where possible (the files are replaced, never edited)."""
    if not old.is_dir():
        return
    new.mkdir(parents=True, exist_ok=True)
    for f in old.glob("*.npz"):
        try:
            os.link(f, new / f.name)
        except OSError:
            shutil.copy2(f, new / f.name)


def _summary(cfg: TrainConfig, target: Path, out: Path, classes: list[str], tr: Features, va: Features, report: dict,
             val_loss: float | None, identity: dict, spec, layers, head_training: dict, fine: dict | None,
             cache: FeatureCache, engine: dict, devices: dict, timings: dict) -> dict:
    """The run's summary (run.json without the file lists)."""
    return {
        "edgetl_version": __version__,
        "run_dir": str(target),
        "classes": classes,
        "num_train": int(len(tr.labels)),
        "num_val": int(len(va.labels)),
        "val_accuracy": report["accuracy"] if len(va.labels) else None,
        "val_loss": val_loss,
        "skipped": tr.skipped + va.skipped,
        "num_skipped": len(tr.skipped) + len(va.skipped),
        "backbone": identity,
        "preprocessing": spec.to_dict(),
        "head": {"layers": [list(w.shape) for w, _ in layers], "activation": "relu", "output": "softmax"},
        "head_training": head_training,
        "fine_tune": fine,
        "augment": cfg.augment,
        "feature_cache": {"path": str(_final_path(cache.path, out, target)), "hits": tr.cache_hits + va.cache_hits,
                          "computed": tr.computed + va.computed},
        "feature_engine": engine,
        "devices": devices,
        "timings_s": {**timings, "total": None},
        # Absolute: export and eval may run from another working directory.
        "data": {"train_dir": str(Path(cfg.data_dir).resolve()),
                 "val_dir": str(Path(cfg.val_dir).resolve()) if cfg.val_dir else None,
                 "val_split": None if cfg.val_dir else cfg.val_split, "split_seed": cfg.split_seed},
    }


def _train_quick(cfg: TrainConfig, target: Path, out: Path, progress: Progress | None, rec: dict) -> dict:
    """The default head-only run without TensorFlow, on a recorded LiteRT backbone (see
    :mod:`.quick`): the same features, solver and figures as the Keras path; no model.keras
    (the run folder builds it when first needed)."""
    from .fast_features import LiteRTBackbone

    t_start = time.perf_counter()
    if cfg.cache_dir is None:
        _seed_cache(target / "cache", out / "cache")
    train_folder, val_folder = _folders(cfg)
    classes = train_folder.classes
    identity = rec["identity"]
    spec = preprocess.Preprocessing.from_dict(rec.get("preprocessing") or _spec_of(identity).to_dict())
    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else out / "cache", rec["key"], identity["feature_dim"])
    t0 = time.perf_counter()
    extractor = LiteRTBackbone(rec["path"], identity["feature_dim"])
    tr, va = _features(cfg, extractor, train_folder, val_folder, spec, cache, progress)
    t_features = time.perf_counter() - t0
    t0 = time.perf_counter()
    layers, val_layers, head_training, row = _solve_head(cfg, tr, va, len(classes), progress)
    t_head = time.perf_counter() - t0
    report, val_loss = _validate(None, layers, val_layers, va, classes)
    engine = {"engine": "litert", "file": str(rec["path"]), "converted": False, "used": True,
              "max_relative_difference": rec.get("max_relative_difference"), "tensorflow": "not imported",
              "checked_against_keras": "when the file was recorded (quick path)"}
    summary = _summary(cfg, target, out, classes, tr, va, report, val_loss, identity, spec, layers, head_training,
                       None, cache, engine, {"gpus": None, "distribute": "none", "replicas": 1},
                       {"features": round(t_features, 3), "head": round(t_head, 3), "fine_tune": 0.0})
    summary["model_keras"] = "built on first use (trained without TensorFlow)"
    _write_run(out, cfg, summary, None, layers, [row], report, tr, va)
    summary["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    atomic_write_json(out / "run.json", _run_json(summary, tr, va))
    return summary


def _features(cfg: TrainConfig, extractor, train_folder: ImageFolder, val_folder: ImageFolder, spec,
              cache: FeatureCache, progress: Progress | None) -> tuple[Features, Features]:
    """The training and validation photos' features (cached, computed by ``extractor``)."""
    tr = extract_features(extractor, train_folder.samples, spec, cache,
                          batch_size=cfg.batch_size, strict=cfg.strict, progress=progress, stage="features (train)")
    va = extract_features(extractor, val_folder.samples, spec, cache,
                          batch_size=cfg.batch_size, strict=cfg.strict, progress=progress, stage="features (val)")
    _check_usable(tr, train_folder, "training")
    return tr, va


def _spec_of(identity: dict):
    from .backbones import get_backbone_spec

    return get_backbone_spec(identity["name"]).preprocessing(int(identity["input_size"]))


def _train(cfg: TrainConfig, target: Path, out: Path, progress: Progress | None) -> dict:
    t_start = time.perf_counter()
    import keras

    keras.utils.set_random_seed(cfg.seed)
    if cfg.cache_dir is None:
        _seed_cache(target / "cache", out / "cache")
    strategy = backend.placement(cfg.distribute)  # first: jax.distributed starts before anything else uses JAX
    train_folder, val_folder = _folders(cfg)
    classes = train_folder.classes
    backend.check_same_everywhere(lambda: _data_identity(cfg, train_folder, val_folder), "photos, labels or options")
    gpus = backend.accelerators()
    policy = backend.mixed_precision(cfg.mixed_precision, gpus)
    if strategy.backend == "jax" and strategy.replicas > 1:
        # keras.distribution splits every batch over the devices: it must divide.
        if cfg.batch_size % strategy.replicas:
            raise ConfigError(f"--distribute {cfg.distribute} splits each batch over {strategy.replicas} devices; "
                              f"received --batch-size {cfg.batch_size}, expected a multiple of {strategy.replicas}")
        if cfg.head_solver != "lbfgs":
            raise ConfigError(f"--distribute {cfg.distribute} under JAX trains the linear (lbfgs) head and fine-tuning; "
                              f"received solver {cfg.head_solver!r} (hidden layers, --augment or --solver adam): "
                              "run those on one device")
    with strategy.scope():
        backbone = build_backbone(cfg.backbone, cfg.alpha, cfg.size, cfg.weights)
    spec = backbone.preprocessing

    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else out / "cache", backbone.key(), backbone.feature_dim)
    t0 = time.perf_counter()
    # LiteRT without a GPU (auto), checked against Keras on the first photos it computes.
    extractor = FeatureEngine(backbone, cfg.feature_engine == "litert" or (cfg.feature_engine == "auto" and not gpus))
    tr, va = _features(cfg, extractor, train_folder, val_folder, spec, cache, progress)
    t_features = time.perf_counter() - t0

    with strategy.scope():
        head = build_head(backbone.feature_dim, len(classes), cfg.hidden, cfg.dropout, cfg.seed)
        classifier = build_classifier(backbone.model, head, cfg.size)
    t0 = time.perf_counter()
    history_rows, head_training, val_layers = _fit_head(cfg, strategy, tr, va, head, classifier, spec, progress)
    t_head = time.perf_counter() - t0
    t0 = time.perf_counter()
    fine, val_probs = None, None
    if cfg.fine_tunes:
        fine, val_probs = _fine_tune(cfg, strategy, backbone, head, tr, va, val_layers, history_rows, progress, out)
    t_fine = time.perf_counter() - t0 if fine else 0.0

    layers = head_layers(head)
    report, val_loss = _validate(val_probs, layers, val_layers, va, classes)
    summary = _summary(cfg, target, out, classes, tr, va, report, val_loss, backbone.identity(), spec, layers,
                       head_training, fine, cache, extractor.info,
                       {"gpus": gpus, **strategy.describe(), "precision": policy},
                       {"features": round(t_features, 3), "head": round(t_head, 3), "fine_tune": round(t_fine, 3)})
    _write_run(out, cfg, summary, classifier, layers, history_rows, report, tr, va)
    summary["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    atomic_write_json(out / "run.json", _run_json(summary, tr, va))
    return summary


def _data_identity(cfg: TrainConfig, train_folder: ImageFolder, val_folder: ImageFolder) -> str:
    """What must be the same on every machine of a multi-machine run: the photos (names, labels,
    sizes) and the options (not the paths, which may differ)."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in ("data_dir", "out_dir", "val_dir", "cache_dir", "weights")}
    photos = [(s.relpath, s.label, s.path.stat().st_size) for f in (train_folder, val_folder) for s in f.samples]
    return json.dumps([options, train_folder.classes, photos])


def _folders(cfg: TrainConfig) -> tuple[ImageFolder, ImageFolder]:
    """The training and validation photos (``--val DIR``, or a split of ``DATA_DIR``)."""
    train_folder = scan_folder(cfg.data_dir, min_classes=2)
    if cfg.val_dir:
        val_folder = scan_folder(cfg.val_dir, classes=train_folder.classes)
    else:
        train_folder, val_folder = split_folder(train_folder, cfg.val_split, cfg.split_seed)
    for name in train_folder.ignored:
        log.warning("ignoring %s: not an image file extension", name)
    return train_folder, val_folder


def _fit_head(cfg: TrainConfig, strategy, tr: Features, va: Features, head, classifier, spec,
              progress: Progress | None) -> tuple[list[dict], dict, object]:
    """The head on the frozen backbone's features: solved (L-BFGS), or descended with Adam (on
    features, or on augmented photos through the classifier). Returns the history rows, how it was
    trained, and the head the validation figures are measured with when it is not the final one."""
    import keras

    num_classes = int(head.output_shape[-1])
    if cfg.head_solver == "lbfgs":
        solved, val_layers, head_training, row = _solve_head(cfg, tr, va, num_classes, progress)
        set_head_layers(head, solved)
        return [row], head_training, val_layers
    ytr = keras.utils.to_categorical(tr.labels, num_classes)
    yva = keras.utils.to_categorical(va.labels, num_classes) if len(va.labels) else None
    cw = class_weight_map(tr.labels, num_classes, cfg.class_weights)
    monitor = "val_loss" if yva is not None else "loss"
    early = keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.patience, restore_best_weights=True)
    stage = "head (augmented)" if cfg.augment else "head"
    if not cfg.augment:
        with strategy.scope():
            head.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                         loss=_loss(cfg.label_smoothing), metrics=["accuracy"])
        hist = head.fit(
            tr.features, ytr, validation_data=(va.features, yva) if yva is not None else None,
            epochs=cfg.epochs, batch_size=cfg.batch_size, class_weight=cw, shuffle=True, verbose=0,
            callbacks=[early, _progress_callback(progress, stage, cfg.epochs)],
        )
    else:
        with strategy.scope():
            inp = keras.Input((cfg.size, cfg.size, 3))
            train_model = keras.Model(inp, classifier(augmentation_layers(spec, cfg.seed)(inp)))
            train_model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                                loss=_loss(cfg.label_smoothing), metrics=["accuracy"])
        ds_tr = make_image_dataset(tr.samples, spec, num_classes, cfg.batch_size, shuffle=True, seed=cfg.seed)
        ds_va = (make_image_dataset(va.samples, spec, num_classes, cfg.batch_size, shuffle=False)
                 if yva is not None else None)
        hist = train_model.fit(ds_tr, validation_data=ds_va, epochs=cfg.epochs, class_weight=cw, verbose=0,
                               callbacks=[early, _progress_callback(progress, stage, cfg.epochs)])
    head_training = {"solver": "adam", **_stopping_summary(hist, monitor, cfg.epochs, cfg.patience)}
    if progress:  # close the bar at the epoch training stopped at (its timer stops there too)
        progress(stage, head_training["epochs_run"], head_training["epochs_run"])
    return _history_rows(hist, "head", 0), head_training, None


def _fine_tune(cfg: TrainConfig, strategy, backbone, head, tr: Features, va: Features, val_layers,
               history_rows: list[dict], progress: Progress | None, workdir: Path) -> tuple[dict, np.ndarray | None]:
    """The top of the backbone trained with the head (:mod:`.finetune`); history rows appended.
    The search starts from the head fitted on the training photos, the final fit (``final_fit``
    'all') from the one on all photos."""
    from .finetune import fine_tune

    now = head_layers(head)
    head_train, head_all = (val_layers, now) if val_layers is not None else (now, None)
    head_acc = (float((head_predict(va.features, head_train).argmax(1) == va.labels).mean())
                if len(va.labels) else None)
    with strategy.scope():
        summary, rows, val_probs = fine_tune(cfg, backbone, head, tr.samples, va.samples, head_train, head_all,
                                             progress, strategy.replicas, workdir, head_acc)
    offset = len(history_rows)
    history_rows += [{"epoch": offset + i + 1, **r} for i, r in enumerate(rows)]
    backbone.weights_sha256 = weights_digest(backbone.model)
    return summary, val_probs


def _validate(val_probs, layers, val_layers, va: Features, classes: list[str]) -> tuple[dict, float | None]:
    """Validation figures: through the head on cached features while the backbone is the frozen
    one (numerically the classifier's own output); after fine-tuning, the fine-tuned model's
    (trained on the training photos) on the photos themselves."""
    if not len(va.labels):
        val_probs = np.zeros((0, len(classes)), np.float32)
    elif val_probs is None:
        val_probs = head_predict(va.features, layers if val_layers is None else val_layers)
    report = classification_report(va.labels, val_probs.argmax(axis=1), classes)
    # the cross-entropy of those same probabilities (no label smoothing or class weights, which
    # the training losses in the history may include; not the head's when it was fine-tuned after)
    n = len(va.labels)
    val_loss = float(-np.mean(np.log(val_probs[np.arange(n), va.labels] + 1e-12))) if n else None
    return report, val_loss


def _final_path(p: Path, staging: Path, target: Path) -> Path:
    """Where ``p`` will be once the staging folder is moved into place."""
    try:
        return target / Path(p).relative_to(staging)
    except ValueError:
        return Path(p)


def _check_usable(feats: Features, folder: ImageFolder, what: str) -> None:
    counts = np.bincount(feats.labels, minlength=len(folder.classes))
    empty = [folder.classes[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in feats.skipped[:5])
        raise DataError(
            f"class(es) {empty} have no usable {what} image after skipping unreadable files"
            + (f" ({reasons})" if reasons else "")
        )


def _run_json(summary: dict, tr: Features, va: Features) -> dict:
    d = dict(summary)
    d["train_files"] = [s.relpath for s in tr.samples]
    d["val_files"] = [s.relpath for s in va.samples]
    return d


def _write_run(out: Path, cfg: TrainConfig, summary: dict, classifier, layers, history_rows,
               report: dict, tr: Features, va: Features) -> None:
    atomic_write_json(out / "config.json", cfg.to_dict())
    atomic_write_text(out / "labels.txt", "\n".join(summary["classes"]) + "\n")
    save_head(out / "head.npz", layers)
    if classifier is not None:  # None: trained without TensorFlow; Run builds model.keras when needed
        tmp = out / ".model.keras.tmp.keras"
        classifier.save(tmp)
        os.replace(tmp, out / "model.keras")
    buf = io.StringIO()
    cols = ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for row in history_rows:
        w.writerow({k: row.get(k, "") for k in cols})
    atomic_write_text(out / "history.csv", buf.getvalue())
    metrics = dict(report)
    metrics["val_loss"] = summary["val_loss"]
    metrics["skipped"] = summary["skipped"]
    metrics["num_train"] = summary["num_train"]
    atomic_write_json(out / "metrics.json", metrics)
    from .plots import plot_confusion, plot_history

    plot_history(history_rows, out / "training_curves.png", summary.get("head_training"))
    plot_confusion(report["confusion_matrix"], summary["classes"], out / "confusion_matrix.png")
    atomic_write_json(out / "run.json", _run_json(summary, tr, va))
