"""Open anything that classifies images and evaluate or query it the same way.

A run folder (Keras), a bundle folder or zip (its classifier file, or backbone + head), or a
bare .tflite/.onnx file (someone else's too, with ``labels``) all become a
:class:`Predictor`: labels, preprocessing, and ``predict(batch) -> probabilities``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import preprocess
from ..bundle import open_bundle
from ..data import load_samples, read_labels, scan_folder
from ..errors import ConfigError, DataError, ModelError
from ..head.arrays import head_predict
from ..head.calibration import with_temperature
from ..metrics import classification_report, top_k
from ..runtime import open_model

log = logging.getLogger("edgetl")
Progress = Callable[[str, int, int], None]


class Predictor:
    labels: list[str]
    preprocessing: preprocess.Preprocessing
    source: str

    def predict(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class KerasPredictor(Predictor):
    def __init__(self, run):
        self.run = run
        self.labels = run.labels
        self.preprocessing = run.preprocessing
        self.source = f"run folder {run.dir}"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.run.classifier.predict_on_batch(x), np.float32)


class FilePredictor(Predictor):
    """A single model file (image -> scores) run in LiteRT or ONNX Runtime."""

    def __init__(self, runner, labels: list[str], spec: preprocess.Preprocessing, source: str):
        self.runner = runner
        self.labels = labels
        self.preprocessing = spec
        self.source = source
        n_out = runner.output.shape[-1]
        if n_out not in (-1, None) and n_out != len(labels):
            raise ModelError(f"{runner.path} outputs {n_out} scores but {len(labels)} labels were given")

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.runner.run(x)


class SplitPredictor(Predictor):
    """Backbone file + NumPy head: what the device runs."""

    def __init__(self, runner, layers, labels, spec, source, temperature: float | None = None):
        self.runner, self.layers, self.labels, self.preprocessing, self.source = runner, layers, labels, spec, source
        self.temperature = temperature  # a personalized bundle's calibration: the device's scores

    def predict(self, x: np.ndarray) -> np.ndarray:
        return with_temperature(head_predict(self.runner.run(x), self.layers), self.temperature)


def _labels_from_file_metadata(runner) -> list[str] | None:
    meta = getattr(runner, "metadata", None) or {}
    if "labels" in meta:
        try:
            return list(json.loads(meta["labels"]))
        except ValueError:
            return meta["labels"].splitlines()
    return None


def _spec_from_file_metadata(runner) -> preprocess.Preprocessing | None:
    meta = getattr(runner, "metadata", None) or {}
    if "preprocessing" in meta:
        return preprocess.Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    return None


def open_predictor(
    path: str | Path,
    labels: str | Path | None = None,
    threads: int | None = None,
    backend: str | None = None,
    precision: str | None = None,
) -> Predictor:
    """Open a run folder, a bundle (folder or .zip), or a bare model file."""

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{str(p)!r} does not exist; expected a run folder, a bundle or a .tflite/.onnx file")
    if p.is_dir() and (p / "run.json").is_file():
        from ..train.run import Run

        return KerasPredictor(Run(p))
    if (p.is_dir() and (p / "manifest.json").is_file()) or p.suffix.lower() == ".zip":

        b = open_bundle(p)
        entry = b.pick("classifier", backend=backend, precision=precision, required=False)
        if entry is not None:
            runner = b.open_model(entry, threads, backend)
            return FilePredictor(runner, b.labels, b.preprocessing, f"bundle {p} ({entry['file']})")
        entry = b.pick("backbone", backend=backend, precision=precision)
        runner = b.open_model(entry, threads, backend)
        return SplitPredictor(runner, b.head(entry), b.labels, b.preprocessing, f"bundle {p} ({entry['file']} + head)",
                              b.temperature(entry))
    if p.is_dir():
        raise ModelError(f"{str(p)!r} is a folder but neither a run folder (run.json) nor a bundle (manifest.json)")
    if p.suffix.lower() == ".keras":
        raise ModelError(f"{str(p)!r}: open the run folder that holds it instead (it carries labels and preprocessing)")
    runner = open_model(p, threads, backend)
    names = read_labels(labels) if labels else _labels_from_file_metadata(runner)
    if names is None:
        sibling = p.with_name("labels.txt")
        if sibling.is_file():
            names = read_labels(sibling)
    if names is None:
        raise ConfigError(f"{str(p)!r} carries no labels; pass --labels FILE (one label per line, in output order)")
    spec = _spec_from_file_metadata(runner)
    if spec is None:
        size = runner.input_size
        if size is None:
            raise ModelError(f"{str(p)!r} has no fixed input size; cannot infer its preprocessing")
        spec = preprocess.mobilenet_v2(size)
        log.info("%s: no preprocessing metadata; assuming MobileNetV2 ([-1, 1]) at %dx%d", p, size, size)
    return FilePredictor(runner, names, spec, f"file {p}")


def predict_files(predictor: Predictor, files: Sequence[str | Path], k: int = 5) -> dict:
    """The ``predict --json`` document: one entry per file, best label first."""
    preds = []
    for f in files:
        try:
            px, _ = preprocess.load_pixels(f, predictor.preprocessing.size)
        except DataError as exc:
            preds.append({"file": str(f), "error": str(exc)})
            continue
        probs = predictor.predict(preprocess.normalize(px[None], predictor.preprocessing))[0]
        top = top_k(probs[None], predictor.labels, k)[0]
        preds.append({"file": str(f), "label": top[0]["label"], "score": top[0]["score"], "top": top})
    return {"predictions": preds}


def evaluate(
    predictor: Predictor,
    data_dir: str | Path,
    batch_size: int = 32,
    progress: Progress | None = None,
    strict: bool = False,
) -> dict:
    """Accuracy, per-class metrics and confusion matrix of ``predictor`` on a class folder.

    Class folders are matched to the model's labels by name.
    """
    folder = scan_folder(data_dir, classes=predictor.labels)
    if not folder.samples:
        raise DataError(f"{str(data_dir)!r} holds no images of the model's classes {predictor.labels}")
    y_true, y_pred, skipped, files = [], [], [], []
    done = 0
    for chunk in preprocess.iter_chunks(folder.samples, batch_size):
        x, y, bad = load_samples(list(chunk), predictor.preprocessing)
        if bad and strict:
            raise DataError(bad[0][1])
        for path, reason in bad:
            log.warning("skipping %s", reason)
            skipped.append({"file": path, "reason": reason})
        if len(y):
            probs = predictor.predict(x)
            pred = np.argmax(probs, axis=1)
            y_pred.extend(pred.tolist())
            y_true.extend(y.tolist())
            bad_paths = {b[0] for b in bad}
            good = [s for s in chunk if str(s.path) not in bad_paths]
            for s, p, row in zip(good, pred, probs):
                files.append({"file": str(s.path), "true": predictor.labels[s.label],
                              "predicted": predictor.labels[int(p)], "score": float(row[int(p)])})
        done += len(chunk)
        if progress:
            progress("evaluate", done, len(folder.samples))
    report = classification_report(np.array(y_true), np.array(y_pred), predictor.labels)
    report["skipped"] = skipped
    report["misclassified"] = [f for f in files if f["true"] != f["predicted"]]
    report["model"] = predictor.source
    report["data_dir"] = str(data_dir)
    return report
