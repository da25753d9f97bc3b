"""Nearest class mean: a classifier that needs no training, for classes too new for the head."""

from __future__ import annotations

import numpy as np

from .arrays import softmax


def ncm_predict(x: np.ndarray, means: np.ndarray, temperature: float = 10.0,
                centre: np.ndarray | None = None) -> np.ndarray:
    """Nearest-class-mean by cosine similarity; scores are a softmax over similarities. With
    ``centre`` (the mean feature of the bundle's replay photos), features and class means are
    centred on it first (SimpleShot: centred, L2-normalised features), which few-shot classes
    need: the features of all photos share a large common component."""
    if centre is not None:
        x, means = x - centre, means - centre
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mn = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return softmax(temperature * (xn @ mn.T)).astype(np.float32)


def ncm_nearest(x: np.ndarray, means: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """The class index ncm_predict ranks first for each row of ``x``, without its scores: a
    feature's own length does not change which mean is nearest in angle, so the features are
    neither copied nor normalised."""
    if centre is not None:
        means = means - centre
    mn = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    sims = np.asarray(x, np.float32) @ mn.T.astype(np.float32)
    if centre is not None:
        sims -= (centre @ mn.T).astype(np.float32)
    return sims.argmax(axis=1)
