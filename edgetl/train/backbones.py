"""Backbone registry: pretrained ImageNet feature extractors from ``keras.applications``.

Each entry knows how to build the pooled (``include_top=False, pooling='avg'``) model,
which alphas and input sizes it accepts, and its preprocessing. A backbone's identity is
the sha256 of its actual weights plus its architecture settings, so cached features and
exported heads can never be mixed up between two different backbones.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import preprocess
from ..errors import ConfigError, ModelError
from ..weights import keras_models_dir


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    keras_name: str  # attribute of keras.applications
    alphas: tuple[float, ...] | None  # None: no width multiplier
    default_alpha: float | None
    min_size: int
    max_size: int
    preprocessing: Callable[[int], preprocess.Preprocessing]
    weight_file: Callable[[float | None, int], str] | None  # the file name Keras caches


def _mnv2_file(alpha: float | None, size: int) -> str:
    rows = size if size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", "MobileNetV2", (0.35, 0.5, 0.75, 1.0, 1.3, 1.4), 1.0, 96, 224,
        preprocess.mobilenet_v2, _mnv2_file,
    ),
    "mobilenet_v3_small": BackboneSpec(
        "mobilenet_v3_small", "MobileNetV3Small", (0.75, 1.0), 1.0, 32, 224,
        lambda s: preprocess.passthrough(s, "mobilenet_v3"), None,
    ),
    "mobilenet_v3_large": BackboneSpec(
        "mobilenet_v3_large", "MobileNetV3Large", (0.75, 1.0), 1.0, 32, 224,
        lambda s: preprocess.passthrough(s, "mobilenet_v3"), None,
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0", "EfficientNetB0", None, None, 32, 224,
        lambda s: preprocess.passthrough(s, "efficientnet"), None,
    ),
    "vgg16": BackboneSpec(
        "vgg16", "VGG16", None, None, 32, 224, lambda s: preprocess.caffe(s, "vgg16"), None,
    ),
    "resnet50": BackboneSpec(
        "resnet50", "ResNet50", None, None, 32, 224, lambda s: preprocess.caffe(s, "resnet50"), None,
    ),
}


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:

        close = difflib.get_close_matches(name, list(BACKBONES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown backbone {name!r}{hint} Known: {', '.join(BACKBONES)}") from None


def resolve_backbone(name: str, alpha: float | None, size: int) -> tuple[BackboneSpec, float | None, int]:
    """Check a backbone name, width multiplier and input size (no TensorFlow needed)."""
    spec = get_backbone_spec(name)
    if spec.alphas is None:
        if alpha not in (None, 1.0):
            raise ConfigError(f"backbone {name!r} has no width multiplier; received alpha={alpha}")
        alpha = None
    else:
        alpha = spec.default_alpha if alpha is None else float(alpha)
        if alpha not in spec.alphas:
            raise ConfigError(f"alpha for {name!r} must be one of {list(spec.alphas)}; received {alpha}")
    size = int(size)
    if not spec.min_size <= size <= spec.max_size:
        raise ConfigError(
            f"input size for {name!r} must be between {spec.min_size} and {spec.max_size}; received {size}"
        )
    return spec, alpha, size


@dataclass
class Backbone:
    """A built backbone: the Keras model (image -> pooled feature) and its identity."""

    model: object  # keras.Model
    spec: BackboneSpec
    alpha: float | None
    size: int
    weights: str  # "imagenet", "none" or a path
    feature_dim: int
    weights_sha256: str

    @property
    def preprocessing(self) -> preprocess.Preprocessing:
        return self.spec.preprocessing(self.size)

    def identity(self) -> dict:
        weights = self.weights if self.weights in ("imagenet", "none") else Path(self.weights).name
        return {
            "name": self.spec.name,
            "alpha": self.alpha,
            "input_size": self.size,
            "weights": weights,
            "weights_sha256": self.weights_sha256,
            "feature_dim": self.feature_dim,
        }

    def key(self) -> str:
        """Short stable key for caches: architecture + size + weights hash + decoder version."""
        blob = f"{self.spec.name}|{self.alpha}|{self.size}|{self.weights_sha256}|decode{preprocess.DECODE_VERSION}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        arr = np.ascontiguousarray(np.asarray(w))
        h.update(w.path.encode() if hasattr(w, "path") else b"")
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def build_backbone(
    name: str = "mobilenet_v2",
    alpha: float | None = None,
    size: int = 224,
    weights: str = "imagenet",
) -> Backbone:
    """Build a pooled, frozen backbone. ``weights``: 'imagenet', 'none' or a path to an .h5 file."""
    spec, alpha, size = resolve_backbone(name, alpha, size)
    weights = str(weights)
    if weights.lower() == "none":
        keras_weights = None
        weights = "none"
    elif weights.lower() == "imagenet":
        keras_weights = "imagenet"
        weights = "imagenet"
    else:
        p = Path(weights)
        if not p.is_file():
            raise ModelError(
                f"weights file {weights!r} does not exist; expected 'imagenet', 'none' or a path to an .h5 file"
            )
        keras_weights = str(p)

    import keras

    ctor = getattr(keras.applications, spec.keras_name)
    kwargs = dict(input_shape=(size, size, 3), include_top=False, weights=keras_weights, pooling="avg")
    if alpha is not None:
        kwargs["alpha"] = alpha
    try:
        model = ctor(**kwargs)
    except Exception as exc:  # Keras raises bare Exception on a failed download
        text = str(exc)
        expected = spec.weight_file(alpha, size) if spec.weight_file else None
        if keras_weights == "imagenet" and (expected is None or not (keras_models_dir() / expected).is_file()):
            what = expected or f"the {spec.keras_name} no-top .h5 file"
            raise ModelError(
                f"the ImageNet weights for {name} (alpha {alpha}, {size}x{size}) are not in the Keras cache "
                f"and could not be downloaded ({text.splitlines()[0][:160] if text else type(exc).__name__}). "
                f"Put {what} into {keras_models_dir()} ('edgetl weights add FILE_OR_FOLDER' copies it there; "
                f"set KERAS_HOME to move it), "
                f"or pass --weights PATH/TO/FILE.h5"
            ) from None
        if keras_weights not in (None, "imagenet"):
            raise ModelError(
                f"weights file {keras_weights!r} does not fit backbone {name} (alpha {alpha}): {text[:300]}"
            ) from None
        raise ModelError(f"cannot build backbone {name}: {text[:300]}") from None
    model.trainable = False
    feature_dim = int(model.output_shape[-1])
    return Backbone(
        model=model, spec=spec, alpha=alpha, size=size, weights=weights,
        feature_dim=feature_dim, weights_sha256=weights_digest(model),
    )
