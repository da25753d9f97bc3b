"""The Keras classification head and the image pipeline for end-to-end stages."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .. import preprocess
from ..data import Sample
from ..head.arrays import Layers


def build_head(feature_dim: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0, seed: int = 0):
    """Input(feature) -> [Dropout -> Dense(h, relu)]* -> Dropout -> Dense(classes, softmax)."""
    import keras

    inp = keras.Input((feature_dim,), name="feature")
    x = inp
    for i, units in enumerate(hidden):
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=seed + i, name=f"dropout_{i}")(x)
        x = keras.layers.Dense(int(units), activation="relu", name=f"hidden_{i}")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed + len(hidden), name="dropout_out")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inp, out, name="head")


def head_layers(head_model) -> Layers:
    """The head's Dense layers as (W, b) arrays, in order."""
    import keras

    return [
        (np.asarray(layer.kernel, np.float32), np.asarray(layer.bias, np.float32))
        for layer in head_model.layers
        if isinstance(layer, keras.layers.Dense)
    ]


def set_head_layers(head_model, layers: Layers) -> None:
    """Put (W, b) arrays (e.g. the solver's) into the head's Dense layers, in order: the Keras
    model, head.npz, the bundle and the device then hold the same numbers."""
    import keras

    from ..errors import ConfigError

    dense = [layer for layer in head_model.layers if isinstance(layer, keras.layers.Dense)]
    if len(dense) != len(layers):
        raise ConfigError(f"the head has {len(dense)} dense layers; received {len(layers)} (W, b) pairs")
    for layer, (w, b) in zip(dense, layers):
        layer.set_weights([w, b])


def build_classifier(backbone_model, head_model, size: int):
    """image -> backbone (always in inference mode, so BatchNorm stays frozen) -> head."""
    import keras

    inp = keras.Input((size, size, 3), name="image")
    feat = backbone_model(inp, training=False)
    out = head_model(feat)
    return keras.Model(inp, out, name="classifier")


def make_image_dataset(
    samples: Sequence[Sample],
    spec: preprocess.Preprocessing,
    num_classes: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    label_smoothing_onehot: bool = True,
):
    """A ``keras.utils.PyDataset`` that decodes images with :mod:`edgetl.preprocess`."""
    import keras

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.samples = list(samples)
            self.order = np.arange(len(self.samples))
            self.rng = np.random.default_rng(seed)
            if shuffle:
                self.rng.shuffle(self.order)

        def __len__(self):
            return math.ceil(len(self.samples) / batch_size)

        def __getitem__(self, idx):
            chosen = [self.samples[i] for i in self.order[idx * batch_size : (idx + 1) * batch_size]]
            px = np.stack([preprocess.load_pixels(s.path, spec.size)[0] for s in chosen])
            x = preprocess.normalize(px, spec)
            y = np.eye(num_classes, dtype=np.float32)[[s.label for s in chosen]]
            return x, y

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

    return ImageBatches()


def augmentation_layers(spec: preprocess.Preprocessing, seed: int = 0):
    """Flip, rotation, zoom and brightness, active only in training."""
    import keras

    lo = float(min(spec.offset))
    hi = float(255.0 * spec.scale + max(spec.offset))

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.08, seed=seed + 1),
            keras.layers.RandomZoom(0.15, seed=seed + 2),
            keras.layers.RandomBrightness(0.15, value_range=(lo, hi), seed=seed + 3),
        ],
        name="augment",
    )
