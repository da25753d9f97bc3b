"""TFLite export: fp32, fp16, dynamic-range and full-integer int8 (via a SavedModel)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError
from ..fileio import atomic_write_bytes
from .checks import check_tflite
from .common import ExportSource
from .config import ExportConfig
from .quantization import QuantizationConfig


def export(source: ExportSource, path: Path, precision: str, options: ExportConfig) -> dict:
    import tensorflow as tf

    if precision == "int8" and not options.full_integer:
        quant = QuantizationConfig.for_int8_mixed(source.role, options.float_error)
    else:
        quant = QuantizationConfig.for_precision(precision, options.io)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(source.saved_model()))
    try:
        flatbuffer, float_layers = quant.convert(converter, source.calibration if quant.needs_calibration else None)
    except Exception as exc:  # the converter raises many types
        raise ExportError(f"TFLite conversion of the {source.role} to {precision} failed: {str(exc)[:400]}") from None
    atomic_write_bytes(path, flatbuffer)
    info = check_tflite(path, precision, quant.io if precision == "int8" else "float",
                        float_ops=quant.float_ops, mixed=quant.float_error is not None)
    info["entry"] = {"flex_ops": bool(info["flex_or_custom_ops"])}  # the manifest entry's TFLite-only field
    if precision == "int8" and not options.full_integer:
        info["quantization"] = {"float_ops": list(quant.float_ops), "float_error_threshold": quant.float_error,
                                "float_layers": float_layers}
    return info
