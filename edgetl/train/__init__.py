"""Workstation training (needs TensorFlow: ``pip install 'edgetl[train]'``).

``TrainConfig`` imports no TensorFlow, so a command can check its arguments before the
(seconds-long) TensorFlow import; ``train`` imports it on first use.
"""

from .config import TrainConfig


def __getattr__(name: str):
    if name == "train":
        from ..errors import require_installed

        # Checked, not imported: a default head-only run on a recorded LiteRT backbone never
        # imports TensorFlow (see edgetl.train.quick).
        from .backend import wanted

        require_installed(wanted(), "train" if wanted() == "tensorflow" else f"train-{wanted()}")  # KERAS_BACKEND: tensorflow (default), jax or torch
        require_installed("keras", "train")
        from .trainer import train

        return train
    raise AttributeError(f"module 'edgetl.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "train"]
