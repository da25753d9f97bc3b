"""The frozen backbone through LiteRT (XNNPACK) for feature extraction on a CPU.

Keras runs the pooled MobileNetV2 at ~110 images/s on a 2-core x86 (AVX-512); the same float32
graph converted to TFLite runs ~2x faster in LiteRT (see benchmarks/train_speed.py). The file is
converted once per backbone identity (architecture, size, weights hash: ``Backbone.key()``) and
kept beside the Keras weights, in ``$KERAS_HOME/edgetl/backbones/<key>.tflite``. Every run checks it
against the Keras model on its first batch of photos before using it; a file that disagrees
is not used (Keras computes the features, with a warning).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes
from ..weights import keras_models_dir
from .backbones import Backbone

log = logging.getLogger("edgetl")

AGREEMENT = 1e-3  # the largest |LiteRT - Keras| feature difference allowed, relative to the largest feature


def backbone_cache_dir() -> Path:
    return keras_models_dir().parent / "edgetl" / "backbones"


class LiteRTBackbone:
    """``predict_on_batch`` and ``output_shape`` like the Keras model, on a converted file."""

    def __init__(self, path: Path, feature_dim: int, threads: int | None = None):
        from ..runtime import TFLiteRunner

        self.path = path
        self.runner = TFLiteRunner(path, threads=threads or os.cpu_count() or 1)
        self.output_shape = (None, feature_dim)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        # One photo per call: XNNPACK's threads are used best at batch 1 (measured on a 2-core x86,
        # MobileNetV2 fp32, 2 threads: 3.1 ms per photo at batch 1, 3.9 at batch 32).
        x = np.asarray(x, np.float32)
        return np.concatenate([self.runner.run(x[i : i + 1]) for i in range(len(x))]) if len(x) else x


def convert(backbone: Backbone, path: Path) -> None:
    """The Keras backbone as a float32 TFLite file (through a SavedModel, as the exporter does)."""
    import tensorflow as tf

    work = Path(tempfile.mkdtemp(prefix="edgetl-backbone-"))
    try:
        backbone.model.export(str(work / "saved_model"), format="tf_saved_model", verbose=False)
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(work / "saved_model")).convert()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, flatbuffer)


def litert_backbone(backbone: Backbone, probe: np.ndarray) -> tuple[LiteRTBackbone | None, dict]:
    """The backbone's LiteRT file (converted on first use), checked against Keras on ``probe``
    (a batch of preprocessed photos). Returns it, or None when it cannot be made or disagrees,
    and what happened."""
    path = backbone_cache_dir() / f"{backbone.key()}.tflite"
    info: dict = {"file": str(path), "converted": False}
    try:
        if not path.is_file():
            log.info("converting the backbone to TFLite once, for faster features: %s", path)
            convert(backbone, path)
            info["converted"] = True
        fast = LiteRTBackbone(path, backbone.feature_dim)
        if len(probe):
            want = np.asarray(backbone.model.predict_on_batch(probe), np.float32)
            got = fast.predict_on_batch(probe)
            diff = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
            info["max_relative_difference"] = diff
            if not diff <= AGREEMENT:
                log.warning("the LiteRT backbone %s differs from Keras by %.2g (allowed %g); computing features with "
                            "Keras", path, diff, AGREEMENT)
                return None, {**info, "used": False, "reason": "disagrees with Keras"}
        return fast, {**info, "used": True}
    except Exception as exc:  # a converter or runtime failure costs speed, never the run
        log.warning("cannot use LiteRT for features (%s); computing them with Keras", str(exc).splitlines()[0][:200])
        return None, {**info, "used": False, "reason": str(exc).splitlines()[0][:200]}
