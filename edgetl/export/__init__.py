"""Export trained runs to TFLite / ONNX bundles (needs TensorFlow: ``edgetl[train]``)."""

from ..errors import require

require("tensorflow", "train")

from .exporter import export_run  # noqa: E402

__all__ = ["export_run"]
