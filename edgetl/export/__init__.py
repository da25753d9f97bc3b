"""Export trained runs to TFLite / ONNX bundles (needs TensorFlow: ``edgetl[train]``).

``edgetl.export.config`` (what to export, and the CLI's defaults) imports without TensorFlow.
"""

__all__ = ["export_run"]


def __getattr__(name: str):
    if name == "export_run":
        from ..errors import require

        require("tensorflow", "train")
        from .exporter import export_run

        return export_run
    raise AttributeError(f"module 'edgetl.export' has no attribute {name!r}")
