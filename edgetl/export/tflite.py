"""TFLite export: fp32, fp16, dynamic-range and full-integer or mixed int8."""

from __future__ import annotations

from pathlib import Path

from ..convert.quantization import QuantizationConfig
from ..convert.source import ExportSource
from ..convert.tflite import to_tflite
from .config import ExportConfig


def export(source: ExportSource, path: Path, precision: str, options: ExportConfig) -> dict:
    mixed = precision == "int8" and not options.full_integer
    if mixed:
        quant = QuantizationConfig.for_int8_mixed(source.role, options.float_error)
    else:
        quant = QuantizationConfig.for_precision(precision, options.io)
    return to_tflite(source, path, quant, mixed=mixed)
