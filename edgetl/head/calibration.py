"""Calibrating a trained head on held-back photos: a temperature for its scores, and a bias for
classes learned from a few photos, bounded by what it costs the classes it already knew."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from .arrays import head_predict, softmax

BIAS_GRID = tuple(np.arange(0.0, 4.01, 0.25))
GUARD_MIN_PHOTOS = 50  # held-back replay photos needed to refuse a training for forgetting


def new_class_bias(layers, x: np.ndarray, y: np.ndarray, device_classes: list[int], num_classes: int,
                    budget: float, reference: float) -> dict:
    """The largest bias for the device's classes (on BIAS_GRID) that keeps held-back replay photos
    of the bundle's classes within ``budget`` of ``reference`` (their accuracy under a head of the
    bundle's classes alone). A head trained from a few photos per new class under-predicts them
    (L2 shrinks what little they pull); this gives them what the budget allows, measured on
    photos neither head trained on."""
    logp = np.log(head_predict(x, layers) + 1e-30)
    offset = np.zeros(num_classes)
    offset[device_classes] = 1.0
    without = float((logp.argmax(1) == y).mean())
    chosen, cost = 0.0, reference - without
    for delta in BIAS_GRID[1:]:
        acc = float(((logp + delta * offset).argmax(1) == y).mean())
        if reference - acc > budget + 1e-9:
            break
        chosen, cost = float(delta), reference - acc
    # Too few held-back photos measure a loss too coarsely to refuse a training on it (3 photos:
    # steps of 33 points): the forgetting check then passes, and says it could not judge.
    judged = len(y) >= GUARD_MIN_PHOTOS
    return {"bias": chosen, "budget": budget, "held_back_replay": int(len(y)), "reference_accuracy": reference,
            "cost_without_bias": round(reference - without, 6), "cost": round(cost, 6), "judged": judged,
            "within_budget": not judged or reference - without <= budget + 1e-9}


def with_bias(layers, bias: dict | None, labels: list[str]):
    """``layers`` with ``bias['bias']`` added to the output biases of ``bias['classes']``."""
    if not bias or not bias["bias"]:
        return layers
    w, b = layers[-1]
    b = b.copy()
    b[[labels.index(n) for n in bias["classes"] if n in labels]] += bias["bias"]
    return [*layers[:-1], (w, b)]


def without_bias(layers, info: dict, labels: list[str]):
    """``layers`` without the bias a head version's info records for its device classes."""
    bias = info.get("new_class_bias")
    if not bias or not bias["bias"]:
        return layers
    return with_bias(layers, {**bias, "bias": -bias["bias"]}, labels)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """The temperature T that makes ``softmax(log(probs) / T)`` best calibrated on labelled
    held-back samples (least negative log-likelihood; Guo et al. 2017). Returns T and the mean
    NLL before and after."""
    logits = np.log(np.maximum(np.asarray(probs, np.float64), 1e-30))
    rows = np.arange(len(y))

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y]))

    # To 1e-5: the phone computes the same temperature (its probabilities within 1e-3 of the Pi's).
    best = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-5})
    return float(best.x), nll(1.0), float(best.fun)


def with_temperature(probs: np.ndarray, t: float | None) -> np.ndarray:
    if not t or t == 1.0 or not len(probs):
        return probs
    return softmax(np.log(np.maximum(np.asarray(probs, np.float64), 1e-30)) / t).astype(np.float32)
