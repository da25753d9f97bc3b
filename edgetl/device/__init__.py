"""The device side: NumPy + LiteRT or ONNX Runtime. Never imports TensorFlow."""

from ..head.fit import HeadTrainConfig
from .learner import Learner
from .store import SampleStore

__all__ = ["HeadTrainConfig", "Learner", "SampleStore"]
