"""Quantization settings for the TFLite converter, with named constructors.

This is the ONLY place that writes converter options (optimizations, supported types and
ops, representative data, I/O types), so no second writer can silently undo int8-only ops.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..formats import IO_TYPES


@dataclass(frozen=True)
class QuantizationConfig:
    precision: str  # fp32 | fp16 | dynamic | int8
    io: str = "float"  # int8 | uint8 | float: model input/output type (int8 precision only)

    @classmethod
    def for_float32(cls) -> QuantizationConfig:
        return cls("fp32")

    @classmethod
    def for_float16(cls) -> QuantizationConfig:
        return cls("fp16")

    @classmethod
    def for_dynamic(cls) -> QuantizationConfig:
        return cls("dynamic")

    @classmethod
    def for_int8(cls, io: str = "int8") -> QuantizationConfig:
        if io not in IO_TYPES:
            raise ConfigError(f"io must be one of {', '.join(IO_TYPES)}; received {io!r}")
        return cls("int8", io)

    @classmethod
    def for_precision(cls, precision: str, io: str = "int8") -> QuantizationConfig:
        makers = {"fp32": cls.for_float32, "fp16": cls.for_float16, "dynamic": cls.for_dynamic}
        if precision == "int8":
            return cls.for_int8(io)
        if precision not in makers:
            raise ConfigError(f"unknown TFLite precision {precision!r}; expected fp32, fp16, dynamic or int8")
        return makers[precision]()

    @property
    def needs_calibration(self) -> bool:
        return self.precision == "int8"

    def apply(self, converter, calibration: np.ndarray | None = None) -> None:
        import tensorflow as tf

        if self.precision == "fp32":
            return
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if self.precision == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        elif self.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise ConfigError("int8 quantization needs calibration images; received none")
            converter.representative_dataset = _representative(calibration)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io_type = {"int8": tf.int8, "uint8": tf.uint8, "float": tf.float32}[self.io]
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type


def _representative(calibration: np.ndarray):
    def gen() -> Iterable[list[np.ndarray]]:
        for i in range(len(calibration)):
            yield [calibration[i : i + 1].astype(np.float32)]

    return gen
