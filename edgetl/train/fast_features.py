"""The frozen backbone through LiteRT (XNNPACK) for feature extraction on a CPU.

The same float32 graph converted to TFLite runs faster in LiteRT than in Keras on a CPU
(benchmarks/train_speed.py). The file is
converted once per backbone identity (architecture, size, weights hash: ``Backbone.key()``) and
kept beside the Keras weights, in ``$KERAS_HOME/edgetl/backbones/<key>.tflite``. Every run that
computes features checks it against the Keras model on photos of its first batch before using
it; a file that disagrees is not used (Keras computes the features, with a warning).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..convert.quantization import QuantizationConfig
from ..convert.source import ExportSource
from ..convert.tflite import to_tflite
from ..runtime import TFLiteRunner
from .backbones import Backbone
from .backend import predict
from .quick import backbone_cache_dir, record

log = logging.getLogger("edgetl")

AGREEMENT = 1e-3  # the largest |LiteRT - Keras| feature difference allowed, relative to the largest feature
PROBE_PHOTOS = 8  # photos the LiteRT file is checked against Keras on, every run that computes features


class LiteRTBackbone:
    """``predict_on_batch`` and ``output_shape`` like the Keras model, on a converted file."""

    def __init__(self, path: Path, feature_dim: int, threads: int | None = None):
        self.path = path
        self.runner = TFLiteRunner(path, threads=threads or os.cpu_count() or 1)
        self.output_shape = (None, feature_dim)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        # One photo per call: XNNPACK's threads are used best at batch 1.
        x = np.asarray(x, np.float32)
        return np.concatenate([self.runner.run(x[i : i + 1]) for i in range(len(x))]) if len(x) else x


def convert(backbone: Backbone, path: Path) -> None:
    """The Keras backbone as a float32 TFLite file: the exporter's own fp32 conversion (through a
    SavedModel) and its checks of the file."""
    work = Path(tempfile.mkdtemp(prefix="edgetl-backbone-"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        source = ExportSource("backbone", backbone.model, work, np.zeros((0, backbone.size, backbone.size, 3), np.float32))
        to_tflite(source, path, QuantizationConfig.for_float32())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def litert_backbone(backbone: Backbone, probe: np.ndarray) -> tuple[LiteRTBackbone | None, dict]:
    """The backbone's LiteRT file (converted on first use), checked against Keras on ``probe``
    (a batch of preprocessed photos). Returns it, or None when it cannot be made or disagrees,
    and what happened."""
    path = backbone_cache_dir() / f"{backbone.key()}.tflite"
    info: dict = {"file": str(path), "converted": False}
    try:
        if not path.is_file():
            import keras

            if keras.backend.backend() != "tensorflow":  # the converter needs TensorFlow's own graph
                return None, {**info, "used": False,
                              "reason": f"converting needs the tensorflow backend (this run: {keras.backend.backend()})"}
            log.info("converting the backbone to TFLite once, for faster features: %s", path)
            convert(backbone, path)
            info["converted"] = True
        fast = LiteRTBackbone(path, backbone.feature_dim)
        want = predict(backbone.model, probe)
        got = fast.predict_on_batch(probe)
        diff = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
        info["max_relative_difference"] = diff
        if not diff <= AGREEMENT:
            log.warning("the LiteRT backbone %s differs from Keras by %.2g (allowed %g); computing features with "
                        "Keras", path, diff, AGREEMENT)
            return None, {**info, "used": False, "reason": "disagrees with Keras"}
        record(backbone, path, info)  # later runs of these weights may then skip TensorFlow
        return fast, {**info, "used": True}
    except Exception as exc:  # a converter or runtime failure costs speed, never the run
        log.warning("cannot use LiteRT for features (%s); computing them with Keras", str(exc).splitlines()[0][:200])
        return None, {**info, "used": False, "reason": str(exc).splitlines()[0][:200]}


class FeatureEngine:
    """What :func:`edgetl.train.features.extract_features` runs the photos through. With
    ``litert``, the choice is made on the first batch the cache does not hold: the LiteRT file is
    checked against Keras on up to ``PROBE_PHOTOS`` of its photos, and Keras computes the
    features if it disagrees or cannot be made. Nothing is converted or checked when every
    feature is cached. ``info`` says what happened (the run's ``feature_engine``)."""

    def __init__(self, backbone: Backbone, litert: bool):
        self.backbone = backbone
        self.output_shape = (None, backbone.feature_dim)
        self._model = None if litert else backbone.model
        self.info: dict = ({"engine": "litert", "used": False, "reason": "every feature was cached"} if litert
                           else {"engine": "keras"})

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        if self._model is None:
            fast, info = litert_backbone(self.backbone, np.asarray(x[:PROBE_PHOTOS], np.float32))
            self._model = fast or self.backbone.model
            self.info = {"engine": "litert" if fast is not None else "keras", **info}
        if self._model is self.backbone.model:
            return predict(self._model, x)
        return np.asarray(self._model.predict_on_batch(x), np.float32)
