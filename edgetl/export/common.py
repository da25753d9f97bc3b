"""What every exporter module receives: the same source and options objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats import FLOAT_ERROR


@dataclass(frozen=True)
class ExportOptions:
    io: str = "int8"  # int8 | uint8 | float: I/O type of full-integer TFLite files
    opset: int = 17  # ONNX opset
    max_classes: int | None = None  # tflite-trainable: output slots (default: the classes + 8)
    train_lr: float = 0.01  # tflite-trainable: SGD learning rate baked into train()
    train_l2: float = 1e-4  # tflite-trainable: L2 baked into train()
    # int8 TFLite: full-integer files (every op int8, I/O per ``io``; for accelerators that need
    # one). By default int8 files are mixed: a classifier's head and the layers int8 hurts most
    # stay float (quantization.QuantizationConfig.for_int8_mixed), with float I/O.
    full_integer: bool = False
    float_error: float | None = FLOAT_ERROR  # mixed int8: layers above this error stay float


@dataclass
class ExportSource:
    """One Keras model to convert (a role: classifier or backbone), with its calibration data.

    The SavedModel is exported once per role and reused by every TFLite precision.
    """

    role: str
    model: object  # keras.Model
    workdir: Path
    calibration: np.ndarray  # float32, preprocessed training photos
    metadata: dict[str, str] = field(default_factory=dict)
    head: list | None = None  # the head's (W, b) layers, for head-only formats
    _saved_model: Path | None = None

    def saved_model(self) -> Path:
        if self._saved_model is None:
            path = self.workdir / f"saved_model_{self.role}"
            # Measured: Keras 3 + from_concrete_functions can produce a model without weights;
            # the SavedModel route keeps them.
            self.model.export(str(path), format="tf_saved_model", verbose=False)
            self._saved_model = path
        return self._saved_model

    @property
    def input_size(self) -> int:
        return int(self.model.input_shape[1])
