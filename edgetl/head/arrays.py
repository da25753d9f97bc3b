"""The classification head as plain arrays: the workstation/device exchange format.

A head is a stack of dense layers: ``h = relu(h @ W_i + b_i)`` for every layer but the
last, and ``softmax(h @ W_last + b_last)`` for the last. Saved as ``.npz`` with keys
``W0, b0, W1, b1, ...`` and loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..fileio import atomic_write_bytes

Layers = list[tuple[np.ndarray, np.ndarray]]


def save_head(path: str | Path, layers: Layers) -> None:
    """Write atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(path, head_bytes(layers))


def head_bytes(layers: Layers) -> bytes:
    arrays = {}
    for i, (w, b) in enumerate(layers):
        arrays[f"W{i}"] = np.asarray(w, np.float32)
        arrays[f"b{i}"] = np.asarray(b, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def head_from_npz(data) -> Layers:
    n = sum(1 for k in data.files if k.startswith("W"))
    if n == 0:
        raise ModelError("head file holds no layers; expected arrays W0, b0, ...")
    layers = []
    for i in range(n):
        try:
            w = np.asarray(data[f"W{i}"], np.float32)
            b = np.asarray(data[f"b{i}"], np.float32)
        except KeyError as exc:
            raise ModelError(f"head file misses array {exc}; expected W0, b0, ..., W{n-1}, b{n-1}") from None
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ModelError(f"head layer {i}: W{i} {w.shape} and b{i} {b.shape} do not fit")
        if layers and layers[-1][0].shape[1] != w.shape[0]:
            raise ModelError(f"head layer {i} takes {w.shape[0]} inputs but layer {i-1} gives {layers[-1][0].shape[1]}")
        layers.append((w, b))
    return layers


def load_head(path: str | Path) -> Layers:
    try:
        with np.load(path, allow_pickle=False) as data:
            return head_from_npz(data)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read head file {str(path)!r}: {exc}") from None


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sum_by_class(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Row sums of features ``x`` per class index ``y`` (num_classes x d, float64), as one product
    (class means of replay and stored features, on the device and in bundles)."""
    onehot = np.zeros((num_classes, len(y)), np.float32)
    onehot[np.asarray(y, np.int64), np.arange(len(y))] = 1.0
    return (onehot @ np.asarray(x, np.float32)).astype(np.float64)


def head_logits(x: np.ndarray, layers: Layers) -> np.ndarray:
    h = np.asarray(x, np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def head_predict(x: np.ndarray, layers: Layers) -> np.ndarray:
    return softmax(head_logits(x, layers))


def pad_to_slots(layers: Layers, max_classes: int, live: int | None = None) -> tuple[Layers, np.ndarray]:
    """Pad the last layer to ``max_classes`` outputs with zeros; the mask marks the ``live`` slots."""
    w, b = layers[-1]
    live = w.shape[1] if live is None else live
    if max_classes < w.shape[1]:
        raise ModelError(f"a head with {w.shape[1]} outputs does not fit {max_classes} slots")
    wp = np.zeros((w.shape[0], max_classes), np.float32)
    wp[:, : w.shape[1]] = w
    bp = np.zeros(max_classes, np.float32)
    bp[: w.shape[1]] = b
    mask = np.zeros(max_classes, np.float32)
    mask[:live] = 1.0
    return [*[(a.astype(np.float32), c.astype(np.float32)) for a, c in layers[:-1]], (wp, bp)], mask
