"""Head-only training without TensorFlow, once the backbone's LiteRT file is cached.

The default ``edgetl train`` (frozen backbone, the converged linear head, no augmentation, no
fine-tuning) needs Keras for one thing only once the backbone has been converted to LiteRT: the
backbone's identity (the sha256 of its weights as Keras loads them), which names the feature cache
and the LiteRT file. The first run that converts (or checks) the LiteRT file records that identity
beside it, keyed by the sha256 of the weights *file* it was built from
(``$KERAS_HOME/edgetl/backbones/<key>.json``). A later run with the same backbone, size and weights
file finds the record by hashing the file, and trains without importing TensorFlow at all: features
from the LiteRT file, the head from the NumPy solver, the run folder without ``model.keras``, which
:class:`~edgetl.train.run.Run` builds from the backbone and ``head.npz`` the first time something
needs the Keras model (export, or predict/eval on the run folder), TensorFlow being there then.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .. import preprocess
from ..fileio import atomic_write_json
from ..weights import keras_models_dir
from .backbones import resolve_backbone
from .config import TrainConfig

log = logging.getLogger("edgetl")


def backbone_cache_dir() -> Path:
    return keras_models_dir().parent / "edgetl" / "backbones"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_file(name: str, alpha: float | None, size: int, weights: str) -> Path | None:
    """The file Keras builds the backbone's weights from: the Keras cache's file for 'imagenet'
    (None when the spec does not name it, or it is not cached yet), the given path otherwise."""
    spec, alpha, size = resolve_backbone(name, alpha, size)
    if str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        if spec.weight_file is None:
            return None
        path = keras_models_dir() / spec.weight_file(alpha, size)
    else:
        path = Path(weights)
    return path if path.is_file() else None


def _source(name: str, alpha: float | None, size: int, weights: str) -> dict | None:
    spec, alpha, size = resolve_backbone(name, alpha, size)
    path = weights_file(spec.name, alpha, size, weights)
    if path is None:
        return None
    return {"name": spec.name, "alpha": alpha, "size": size, "weights_file_sha256": _sha256(path)}


def _key(identity: dict) -> str:
    """Backbone.key() from a recorded identity (the decoder version of today)."""
    blob = (f"{identity['name']}|{identity['alpha']}|{identity['input_size']}|{identity['weights_sha256']}"
            f"|decode{preprocess.DECODE_VERSION}")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record(backbone, tflite: Path, info: dict) -> None:
    """After the Keras path made or checked ``tflite`` against Keras: remember which weights file
    gives which identity, so that later runs can skip Keras (never fails a run)."""
    try:
        source = _source(backbone.spec.name, backbone.alpha, backbone.size, backbone.weights)
        if source is None:
            return
        atomic_write_json(tflite.with_suffix(".json"), {
            "source": source, "identity": backbone.identity(), "key": backbone.key(), "tflite": tflite.name,
            "tflite_sha256": _sha256(tflite), "max_relative_difference": info.get("max_relative_difference")})
    except OSError as exc:
        log.info("cannot record the LiteRT backbone %s (%s); later runs will import TensorFlow", tflite, exc)


def find(cfg: TrainConfig) -> dict | None:
    """The recorded LiteRT backbone this config can train on without TensorFlow, or None (the
    config needs Keras: fine-tuning, augmentation, hidden layers, gradient descent, a GPU engine,
    distribution, mixed precision; or nothing is recorded for these weights yet)."""
    if (cfg.fine_tunes or cfg.augment or cfg.hidden or cfg.head_solver != "lbfgs" or cfg.distribute != "none"
            or cfg.mixed_precision or cfg.feature_engine == "keras"):
        return None
    from . import fast_features  # (it imports this module)

    folder = backbone_cache_dir()
    if not folder.is_dir():
        return None
    try:
        source = _source(cfg.backbone, cfg.alpha, cfg.size, cfg.weights)
    except Exception:  # an unreadable weights file: the Keras path says what is wrong
        return None
    if source is None:
        return None
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            if rec.get("source") != source or rec.get("key") != _key(rec["identity"]):
                continue
            tflite = folder / rec["tflite"]
            if not rec.get("max_relative_difference", 1.0) <= fast_features.AGREEMENT:
                continue  # checked against Keras under a looser limit than today's
            if tflite.is_file() and _sha256(tflite) == rec["tflite_sha256"]:
                return {**rec, "path": tflite}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
