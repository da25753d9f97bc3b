"""Workstation training (needs TensorFlow: ``pip install 'edgetl[train]'``)."""

from ..errors import require

require("tensorflow", "train")
require("keras", "train")

from .config import TrainConfig  # noqa: E402
from .trainer import train  # noqa: E402

__all__ = ["TrainConfig", "train"]
