"""What every exporter module receives: the same source object (and the ExportConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
