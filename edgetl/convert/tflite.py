"""A Keras model to a TFLite file through a SavedModel, checked against the precision asked for."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError
from ..fileio import atomic_write_bytes
from .checks import check_tflite
from .quantization import QuantizationConfig
from .source import ExportSource


def to_tflite(source: ExportSource, path: Path, quant: QuantizationConfig, mixed: bool = False) -> dict:
    """Convert ``source`` with ``quant`` and write ``path``; returns the file's checked summary
    (``mixed``: int8 with float layers, whose recipe it records)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(source.saved_model()))
    try:
        flatbuffer, float_layers = quant.convert(converter, source.calibration if quant.needs_calibration else None)
    except Exception as exc:  # the converter raises many types
        raise ExportError(f"TFLite conversion of the {source.role} to {quant.precision} failed: "
                          f"{str(exc)[:400]}") from None
    atomic_write_bytes(path, flatbuffer)
    info = check_tflite(path, quant.precision, quant.io if quant.precision == "int8" else "float",
                        float_ops=quant.float_ops, mixed=quant.float_error is not None)
    info["entry"] = {"flex_ops": bool(info["flex_or_custom_ops"])}  # the manifest entry's TFLite-only field
    if mixed:
        info["quantization"] = {"float_ops": list(quant.float_ops), "float_error_threshold": quant.float_error,
                                "float_layers": float_layers}
    return info
