"""Drive a ``tflite-trainable`` head through its signatures (the phone's path, run in Python).

``Learner(trainer='tflite')`` uses this instead of the NumPy trainer, so the phone path is
exercised on every machine; the exporter checks each file it writes with it. No TensorFlow:
LiteRT (or tflite_runtime) only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelError
from ..runtime import litert_interpreter_class, quiet_stderr
from .arrays import Layers, pad_to_slots
from .fit import HeadTrainConfig, epoch_orders


class TFLiteTrainableHead:
    def __init__(self, path: str | Path, threads: int | None = 1, backend: str | None = None):
        self.path = Path(path)
        _, Interpreter = litert_interpreter_class(backend)
        try:
            with quiet_stderr():
                self.interp = Interpreter(model_path=str(self.path), num_threads=threads or 1)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"LiteRT cannot load the trainable head {self.path}: {exc}") from None
        self.signatures = self.interp.get_signature_list()
        missing = {"infer", "train", "save", "restore"} - set(self.signatures)
        if missing:
            raise ModelError(f"{self.path} is not a trainable head: it lacks the signature(s) {sorted(missing)}")
        self._run = {name: self.interp.get_signature_runner(name) for name in ("infer", "train", "save", "restore")}
        self.n_layers = sum(1 for k in self.signatures["save"]["outputs"] if k.startswith("W"))

    @property
    def max_classes(self) -> int:
        return int(self._run["save"]()["mask"].shape[0])

    def save(self) -> tuple[Layers, np.ndarray]:
        out = self._run["save"]()
        layers = [(np.array(out[f"W{i}"]), np.array(out[f"b{i}"])) for i in range(self.n_layers)]
        return layers, np.array(out["mask"])

    def restore(self, layers: Layers, live: int | None = None, mask: np.ndarray | None = None) -> None:
        """Load a head into the padded slots: ``live`` classes (default: its width), or exactly ``mask``
        (as returned by :meth:`save`)."""
        padded, default_mask = pad_to_slots(layers, self.max_classes, live)
        mask = default_mask if mask is None else np.asarray(mask, np.float32)
        kwargs = {}
        for i, (w, b) in enumerate(padded):
            kwargs[f"W{i}"] = w
            kwargs[f"b{i}"] = b
        kwargs["mask"] = mask
        self._run["restore"](**kwargs)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self._run["train"](feature=np.ascontiguousarray(x, np.float32),
                                        label=np.ascontiguousarray(y, np.int32))["loss"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.array(self._run["infer"](feature=np.ascontiguousarray(x, np.float32))["probabilities"])


def check_config(cfg: HeadTrainConfig, entry: dict) -> None:
    opt = entry.get("optimizer", {})
    want = dict(optimizer="sgd", learning_rate=opt.get("learning_rate"), l2=opt.get("l2"), balance=False, momentum=0.0)
    have = dict(optimizer=cfg.optimizer, learning_rate=cfg.learning_rate, l2=cfg.l2, balance=cfg.balance,
                momentum=cfg.momentum)
    if have != want:
        raise ConfigError(
            f"the bundle's trainable head does one SGD step with learning rate {want['learning_rate']} and l2 "
            f"{want['l2']}, without class balancing; received {have}. Train with --optimizer sgd "
            f"--lr {want['learning_rate']} --l2 {want['l2']} --no-balance, or re-export with other --trainable-lr/--trainable-l2"
        )


def config_for(entry: dict, epochs: int = 20, batch_size: int = 32, seed: int = 0) -> HeadTrainConfig:
    opt = entry["optimizer"]
    return HeadTrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=opt["learning_rate"], optimizer="sgd",
                           l2=opt["l2"], balance=False, seed=seed)


def train_with_tflite(path: str | Path, entry: dict, layers: Layers, x: np.ndarray, y: np.ndarray,
                      cfg: HeadTrainConfig, threads: int | None = 1, on_epoch=None) -> tuple[Layers, list[float]]:
    """Train ``layers`` with the trainable TFLite head at ``path`` (its bundle ``entry`` holds its
    optimizer); same epochs and order as the NumPy trainer. ``on_epoch(epoch, None)`` after every
    epoch (1-based; e.g. progress)."""
    check_config(cfg, entry)
    head = TFLiteTrainableHead(path, threads=threads)
    live = layers[-1][0].shape[1]
    if live > head.max_classes:
        raise ConfigError(f"{live} classes do not fit the trainable head's {head.max_classes} slots; "
                          "re-export with a larger --max-classes")
    head.restore(layers, live)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    history = []
    for order in epoch_orders(len(x), cfg.epochs, cfg.seed):
        losses = [head.train_step(x[order[s : s + cfg.batch_size]], y[order[s : s + cfg.batch_size]])
                  for s in range(0, len(order), cfg.batch_size)]
        history.append(float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(len(history), None)
    trained, _ = head.save()
    w, b = trained[-1]
    return [*trained[:-1], (w[:, :live].copy(), b[:live].copy())], history
