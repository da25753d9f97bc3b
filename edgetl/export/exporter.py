"""Export a run folder into a verified bundle.

For every requested format x precision and role (the full classifier, and the backbone that
on-device learning needs), convert, check the file's tensor types, run it in its real
runtime on the run's validation photos, compare with Keras, apply the int8 accuracy gate,
and move the finished bundle into place in one rename.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__, package_versions, preprocess
from ..bundle import BundleWriter, zip_bundle
from ..bundle.selftest import (
    REFERENCE_PHOTOS,
    REFERENCES,
    References,
    cpu_fingerprint,
    encode_references,
    jpeg_references,
    thresholds,
)
from ..bundle.selftest import measure as measure_file
from ..convert.source import ExportSource
from ..data import Sample, load_samples, scan_folder
from ..errors import ConfigError, ExportError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..formats import MODEL_ROLES, file_format, file_name
from ..head.arrays import Layers, head_predict, load_head
from ..head.fit import HeadTrainConfig, train_head
from ..metrics import cosine
from ..runtime import open_model, run_batched
from ..train.run import Run
from .config import ExportConfig, Plan

log = logging.getLogger("edgetl")
Progress = Callable[..., None]  # (stage, done, total, note=None)

TOOLS = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy", "pillow")


def tool_versions() -> dict[str, str]:
    return {"edgetl": __version__, **package_versions(TOOLS)}


def balanced_subset(samples: list[Sample], n: int) -> list[Sample]:
    """Up to n samples, round-robin over classes, in the run's (deterministic) file order."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if i < len(by_class[label]) and len(out) < n:
                out.append(by_class[label][i])
        i += 1
    return out


def first_per_class(samples: list[Sample], k: int) -> list[Sample]:
    """The first ``k`` samples of each class, in the run's (deterministic) file order."""
    taken: dict[int, int] = {}
    out: list[Sample] = []
    for s in samples:
        if taken.get(s.label, 0) < k:
            taken[s.label] = taken.get(s.label, 0) + 1
            out.append(s)
    return out


def verify_file(path: Path, role: str, x: np.ndarray, y: np.ndarray, reference: np.ndarray,
                head_layers, keras_accuracy: float, keras_pred: np.ndarray, threads: int | None = None) -> dict:
    """Run one exported file in its runtime and compare with the Keras outputs.

    Top-1 agreement is with the Keras classifier's predictions (``keras_pred``) for every file:
    what a user sees when comparing the file with the run.
    """
    runner = open_model(path, threads=threads)
    t0 = time.perf_counter()
    out = run_batched(runner, x)
    seconds = time.perf_counter() - t0
    result = {"num_images": int(len(x)), "runtime": runner.backend, "seconds": round(seconds, 3)}
    if role == "backbone":  # scored through the head the device uses with this file
        cos = cosine(out, reference)
        probs = head_predict(out, head_layers)
        result.update({"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
    else:
        probs = out
        result["max_abs_diff"] = float(np.abs(out - reference).max())
    pred = probs.argmax(1)
    result.update({
        "accuracy": float((pred == y).mean()),
        "keras_accuracy": keras_accuracy,
        "top1_agreement": float((pred == keras_pred).mean()),
    })
    result["accuracy_drop_points"] = round(100 * (keras_accuracy - result["accuracy"]), 3)
    return result


def export_run(run_dir: str | Path, out: str | Path | None = None, config: ExportConfig | None = None,
               progress: Progress | None = None, **options) -> dict:
    """Export ``run_dir`` to a bundle folder; returns the export report (JSON-ready).

    ``config`` (or its fields as keyword arguments, e.g. ``targets=["tflite:int8"]``) says
    what to export; see :class:`~edgetl.export.config.ExportConfig`.
    """

    if config is not None and options:
        raise ConfigError(f"give an ExportConfig or its fields, not both (received {', '.join(options)})")
    unknown = set(options) - set(ExportConfig.fields())
    if unknown:
        raise ConfigError(f"unknown export option(s) {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(ExportConfig.fields())}")
    config = config or ExportConfig(**options)
    t_start = time.perf_counter()
    run = Run(run_dir)
    target = Path(out) if out else Path("models") / run.dir.name
    if target.exists() and not config.force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    if config.max_classes is None:  # the trainable head's slots: room for 8 classes learned on the phone
        config = replace(config, max_classes=len(run.labels) + 8)
    plans = config.plans()
    job = _Export(run, config, progress, total=sum(len(p.files) for p in plans))
    with BundleWriter(target, force=config.force) as writer:
        job.start(writer)
        for plan in plans:
            job.head_file(plan) if plan.from_head else job.model_files(plan)
        report = job.finish()
    report["manifest"] = writer.manifest
    if config.make_zip:
        report["zip"] = str(zip_bundle(target, target.with_suffix(".zip")))
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    return report


class _Export:
    """One export's shared state: the run's photos and Keras references, the staging folder,
    and the bundle's entries as the plans add them."""

    def __init__(self, run, config: ExportConfig, progress: Progress | None, total: int):
        self.run, self.config, self.progress, self.total = run, config, progress, total
        self.done = 0
        self.timings: dict[str, float] = {}  # seconds per step, in the report: where an export's time goes
        self._say("reading the calibration and verification photos")
        self.spec = run.preprocessing
        self.head_layers = run.head()
        train = run.samples("train")
        self.x_cal, _, _ = load_samples(balanced_subset(train, config.calibration_images), self.spec)
        self.replay_samples = first_per_class(train, config.replay_per_class)
        self.val_samples, self.val_source = self._verification_photos(run, config)
        self.x_val, self.y_val, _ = load_samples(self.val_samples, self.spec)
        self._say(f"the Keras model on {len(self.x_val)} verification photos (the reference)")
        self.references: dict[str, np.ndarray] = {}
        self.keras_acc = None
        if config.verify and len(self.x_val):
            self.references["backbone"] = np.asarray(run.backbone_model.predict(self.x_val, batch_size=32, verbose=0),
                                                     np.float32)
            # The classifier is head(backbone(x)): its reference reuses the backbone pass above.
            self.references["classifier"] = np.asarray(
                run.head_model.predict(self.references["backbone"], batch_size=256, verbose=0), np.float32)
            self.keras_acc = float((self.references["classifier"].argmax(1) == self.y_val).mean())
        self.entries: list[tuple[str, dict]] = []
        self.verification: list[dict] = []
        self.extra_heads: dict[str, str] = {}  # backbone file -> its re-fitted head's file
        self.teacher = None  # (photo paths, the float model's probabilities on them), computed once

    @staticmethod
    def _verification_photos(run, config: ExportConfig) -> tuple[list[Sample], str]:
        """The photos every file is verified and gated on, and what they are (said in the report)."""
        if config.val_dir:
            folder = scan_folder(config.val_dir, classes=run.labels)
            if not folder.samples:
                raise ExportError(f"--val {config.val_dir!r} holds no photos of the run's classes {run.labels}")
            return folder.samples, f"{len(folder.samples)} photos of {config.val_dir} (--val)"
        samples = run.samples("val")
        fit_on = run.info.get("head_training", {}).get("fit_on")
        what = f"the run's {len(samples)} validation photos"
        if fit_on == "train+val":
            what += (" (the head was refitted on them too, so they flatter it: give photos it never saw "
                     "with --val DIR)")
        return samples, what

    def start(self, writer: BundleWriter) -> None:
        self.writer = writer
        self.staging = writer.staging
        self.work = self.staging / ".work"
        self.work.mkdir()
        self.metadata = {"labels": _json(self.run.labels), "preprocessing": _json(self.spec.to_dict()),
                         "backbone": _json(self.run.backbone_identity), "edgetl_version": __version__}
        models = {"classifier": self.run.classifier, "backbone": self.run.backbone_model}
        self.sources = {r: ExportSource(r, models[r], self.work, self.x_cal[: self.config.calibration_images],
                                        {**self.metadata, "role": r}) for r in MODEL_ROLES}

    def _say(self, note: str) -> None:
        """What the export is doing now (the progress bar's text); times the step it ends."""
        now = time.perf_counter()
        if getattr(self, "_doing", None) is not None:
            self.timings[self._doing[0]] = round(self.timings.get(self._doing[0], 0.0) + now - self._doing[1], 2)
        self._doing = (note, now)
        if self.progress:
            self.progress("export", self.done, self.total, note)

    def _step(self) -> None:
        self.done += 1
        if self.progress:
            self.progress("export", self.done, self.total, self._doing[0] if getattr(self, "_doing", None) else None)

    def head_file(self, plan: Plan) -> None:
        """A format made from the head's arrays (the trainable head)."""
        role = plan.files[0]
        name = file_name(role, plan.fmt, plan.precision)
        src = ExportSource(role, None, self.work, self.x_cal[:0], self.metadata, head=self.head_layers)
        info = importlib.import_module(plan.fmt.module).export(src, self.staging / name, plan.precision, self.config)
        self.entries.append((name, {"role": role, "format": file_format(plan.fmt), "precision": plan.precision,
                                    "runtime": plan.fmt.runtime, **info}))
        self._step()

    def model_files(self, plan: Plan) -> None:
        """A format converted from the Keras models: the backbone first, since a calibrated
        precision's backbone file gets its own re-fitted head (see _refit_head), which its
        classifier file is then converted with."""
        module = importlib.import_module(plan.fmt.module)
        head = self.head_layers
        for role in plan.convert:
            name = file_name(role, plan.fmt, plan.precision)
            where = self.staging if role in plan.files else self.work
            source = self.sources[role]
            if role == "classifier" and head is not self.head_layers:
                source = ExportSource("classifier", self.run.classifier_with(head), self.work,
                                      self.x_cal[: self.config.calibration_images],
                                      {**self.metadata, "role": "classifier"})
            self._say(f"converting {name}" + (" (int8: calibrating on the training photos)"
                                              if plan.precision == "int8" else ""))
            info = module.export(source, where / name, plan.precision, self.config)
            train_features = None  # this backbone file's features of the training photos
            refit_info = None
            if role == "backbone" and plan.refit:
                self._say(f"re-fitting the head on {name}'s features of the training photos")
                train_features = backbone_features(where / name, self.run.samples("train"), self.spec,
                                                   self.config.threads)
                if self.teacher is None or self.teacher[0] != train_features[2]:
                    self.teacher = (train_features[2], _teacher_probs(self.run.backbone_model, self.head_layers,
                                                                      train_features[2], self.spec))
                head, refit_info = _refit_head(train_features, self.head_layers, self.teacher[1])
                if role in plan.files and head is not self.head_layers:
                    self.extra_heads[name] = self.writer.write_head(head, backbone=name)
            if role not in plan.files:
                continue
            entry = {"role": role, "format": file_format(plan.fmt), "precision": plan.precision,
                     "runtime": plan.fmt.runtime,
                     "input": info["input"], "output": info["output"], **info.get("entry", {})}
            if "quantization" in info:  # the recipe, and for mixed int8 the layers kept in float
                entry["quantization"] = info["quantization"]
            if refit_info is not None and role == "backbone":
                entry["head_refit"] = {**REFIT_CONFIG.__dict__, "targets": "float model probabilities",
                                       "held_out_every": REFIT_HOLDOUT_EVERY, **refit_info}
            if head is not self.head_layers:
                if role == "backbone":
                    entry["head"] = self.extra_heads[name]
                else:  # converted with the head re-fitted for this precision's backbone file
                    entry["head_refit"] = {"from": file_name("backbone", plan.fmt, plan.precision)}
            if plan.verify and len(self.x_val):
                self._say(f"verifying {name} on {len(self.x_val)} photos")
                self._verify(plan, name, role, entry, head)
            if role == "backbone" and self.replay_samples:
                self._say(f"the replay features of {name}")
                entry["replay"] = self._replay(name, train_features)
            self.entries.append((name, entry))
            self._step()

    def _verify(self, plan: Plan, name: str, role: str, entry: dict, head: Layers) -> None:
        v = verify_file(self.staging / name, role, self.x_val, self.y_val, self.references[role], head, self.keras_acc,
                        self.references["classifier"].argmax(1), self.config.threads)
        v.update({"file": name, "role": role, "format": plan.fmt.name, "precision": plan.precision})
        self.verification.append(v)
        entry["verification"] = {k: v[k] for k in ("accuracy", "top1_agreement", "accuracy_drop_points")}
        if plan.gate:
            _gate(v, self.config.max_drop)

    def _replay(self, name: str, train_features) -> str:
        if train_features is None:
            feats, labels, _ = backbone_features(self.staging / name, self.replay_samples, self.spec,
                                                 self.config.threads)
        else:  # the refit's features of all training photos hold the replay photos' too
            row = {path: i for i, path in enumerate(train_features[2])}
            rows = [row[str(x.path)] for x in self.replay_samples if str(x.path) in row]
            feats, labels = train_features[0][rows], train_features[1][rows]
        return self.writer.write_replay(name, feats, labels)

    def finish(self) -> dict:
        """The self-test references, head, labels and report; commits the bundle and returns the report."""
        w, head_layers, run, spec = self.writer, self.head_layers, self.run, self.spec
        shutil.rmtree(self.work, ignore_errors=True)
        self_test = None
        if self.config.verify and self.val_samples:
            self._say("the self-test references")
            self_test = _write_self_test(self.staging, self.entries, self.val_samples, spec, run.backbone_model,
                                         run.head_model, head_layers, self.extra_heads, self.config.threads)
        report = {
            "bundle": str(w.target), "run_dir": str(run.dir), "keras_accuracy": self.keras_acc,
            "num_val_images": int(len(self.x_val)),
            "calibration_images": int(min(self.config.calibration_images, len(self.x_cal))),
            "max_drop_points": self.config.max_drop, "files": self.verification,
            "verified_on_photos": self.val_source,
        }
        self._say("writing the bundle")
        for name, entry in self.entries:
            w.add(name, entry.pop("role"), **entry)
        w.write_head(head_layers)
        if self_test is not None:
            w.add(REFERENCES, "references", format="npz")
        w.write_labels(run.labels)
        atomic_write_json(w.path("export_report.json"), report)
        w.add("export_report.json", "report", format="json")
        extra = {"verification": {"keras_accuracy": self.keras_acc, "num_images": int(len(self.x_val))}}
        if self_test is not None:
            extra["self_test"] = self_test
        w.commit(run.labels, spec, int(run.backbone_identity["feature_dim"]), run.backbone_identity, tool_versions(),
                 **extra)
        self._say("done")
        report["step_seconds"] = {k: v for k, v in self.timings.items()}
        return report


def _write_self_test(staging: Path, entries: list, val_samples: list[Sample], spec, backbone, head_model,
                     head_layers: Layers, extra_heads: dict[str, str], threads: int | None) -> dict:
    """references.npz (validation photos as the device will decode them, with the float model's
    outputs) and, per model file, what it scores on them here and the thresholds a device must meet."""

    chosen = balanced_subset(val_samples, REFERENCE_PHOTOS)
    pixels, _, bad = preprocess.load_pixels_batch([s.path for s in chosen], spec.size)
    bad_paths = {b[0] for b in bad}
    labels = np.array([s.label for s in chosen if str(s.path) not in bad_paths], np.int64)
    blobs, pixels = jpeg_references(pixels)
    features = np.asarray(backbone.predict(preprocess.normalize(pixels, spec), batch_size=32, verbose=0), np.float32)
    probs = np.asarray(head_model.predict(features, batch_size=256, verbose=0), np.float32)
    atomic_write_bytes(staging / REFERENCES, encode_references(blobs, pixels, features, probs, labels))
    refs = References(staging / REFERENCES)
    for name, entry in entries:
        if entry["role"] not in MODEL_ROLES:
            continue
        head = load_head(staging / extra_heads[name]) if name in extra_heads else head_layers
        m = measure_file(open_model(staging / name, threads=threads), refs, spec, entry["role"], head)
        entry["self_test"] = {k: m[k] for k in ("cosine_mean", "cosine_min", "agreement")} | thresholds(m, len(refs))
    return {"file": REFERENCES, "photos": len(refs), "verified_on": cpu_fingerprint()}


# Distillation of the float model into the int8 file's head (see _refit_head): full batch, no
# re-weighting, no L2 (the target is the float model itself), at most REFIT_CONFIG.epochs steps,
# stopped early on held-out training photos.
REFIT_HOLDOUT_EVERY = 5
REFIT_CHECK_EVERY = 10
REFIT_CONFIG = HeadTrainConfig(epochs=1000, batch_size=1 << 20, learning_rate=1e-3, l2=0.0, optimizer="adam",
                               balance=False, seed=0)


def backbone_features(backbone_file: Path, samples: list[Sample], spec, threads: int | None,
                      chunk: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An exported backbone file's features of the readable ``samples``, their labels and paths.

    Photos are decoded ``chunk`` at a time, so memory stays flat however many there are.
    """
    runner = open_model(backbone_file, threads=threads)
    feats, labels, paths = [], [], []
    for part in preprocess.iter_chunks(samples, chunk):
        x, y, bad = load_samples(list(part), spec)
        if len(x):
            feats.append(run_batched(runner, x))
            labels.append(y)
            skipped = {b[0] for b in bad}
            paths += [str(s.path) for s in part if str(s.path) not in skipped]
    if not feats:
        dim = int(runner.output.shape[-1])
        return np.zeros((0, dim), np.float32), np.zeros((0,), np.int64), []
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int64), paths


def _refit_head(train_features: tuple[np.ndarray, np.ndarray, list[str]], head_layers: Layers,
                teacher: np.ndarray) -> tuple[Layers, dict]:
    """Re-fit the head on the QUANTIZED backbone's features of the training photos, distilling
    the float model: the targets are the float classifier's probabilities on the same photos.
    Returns the head and what the re-fit measured.

    Post-training quantization moves the features; the head learns to map the moved features to
    what the float model says. Distillation to convergence over-fits, though (the held-out KL
    divergence to the float model rises with it). So every 5th training photo
    is held out, the re-fit stops at the step with the lowest held-out KL (checked every
    ``REFIT_CHECK_EVERY`` steps; step 0, the float head, included), and the float head is kept
    when no step beats it. Only training photos are used; the validation photos stay for the gate.
    """
    feats = train_features[0]
    holdout = np.arange(len(feats)) % REFIT_HOLDOUT_EVERY == REFIT_HOLDOUT_EVERY - 1
    if holdout.all() or not holdout.any():  # too few photos to hold any out: the float head
        return head_layers, {"steps": 0, "reason": f"{len(feats)} training photos, too few to hold out"}

    def held_out_kl(layers: Layers) -> float:
        p, q = teacher[holdout], head_predict(feats[holdout], layers)
        return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))

    start_kl = held_out_kl(head_layers)
    best = {"kl": start_kl, "steps": 0, "layers": head_layers}

    def check(step: int, layers: Layers) -> None:
        if step % REFIT_CHECK_EVERY == 0:
            kl = held_out_kl(layers)
            if kl < best["kl"]:
                best.update(kl=kl, steps=step, layers=[(w.copy(), b.copy()) for w, b in layers])

    train_head(head_layers, feats[~holdout], teacher[~holdout], REFIT_CONFIG, on_epoch=check)
    info = {"steps": best["steps"], "held_out_photos": int(holdout.sum()),
            "held_out_kl": round(best["kl"], 6), "float_head_held_out_kl": round(start_kl, 6)}
    return best["layers"], info


def _teacher_probs(backbone, head_layers: Layers, paths: list[str], spec, chunk: int = 64) -> np.ndarray:
    """The float model's probabilities on these photos (the distillation targets)."""
    out = []
    for part in preprocess.iter_chunks(paths, chunk):
        x, _, bad = preprocess.load_batch(list(part), spec)
        if bad:
            raise ExportError(f"a training photo became unreadable during export: {bad[0][1]}")
        out.append(head_predict(np.asarray(backbone.predict(x, batch_size=32, verbose=0), np.float32), head_layers))
    return np.concatenate(out)


def _gate(v: dict, max_drop: float) -> None:
    if v["accuracy_drop_points"] > max_drop:
        raise ExportError(
            f"{v['file']}: int8 accuracy {100 * v['accuracy']:.2f}% is {v['accuracy_drop_points']:.2f} points below "
            f"the float Keras model's {100 * v['keras_accuracy']:.2f}% on {v['num_images']} validation photos "
            f"(allowed: {max_drop} points, --max-drop). Export fp16 or dynamic instead "
            f"(--format tflite:fp16 or tflite:dynamic), or calibrate on more images (--calibration-images)."
        )


def _json(obj) -> str:
    return json.dumps(obj)

