"""Workstation training (needs TensorFlow: ``pip install 'edgetl[train]'``).

``TrainConfig`` imports no TensorFlow, so a command can check its arguments before the
(seconds-long) TensorFlow import; ``train`` imports it on first use.
"""

from .config import TrainConfig


def __getattr__(name: str):
    if name == "train":
        from ..errors import require

        require("tensorflow", "train")
        require("keras", "train")
        from .trainer import train

        return train
    raise AttributeError(f"module 'edgetl.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "train"]
