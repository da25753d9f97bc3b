"""Quantization settings for the TFLite converter, with named constructors.

This is the ONLY place that writes converter options (optimizations, supported types and
ops, representative data, I/O types), so no second writer can silently undo int8-only ops.
"""

from __future__ import annotations

import csv
import io as _io
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..formats import FLOAT_ERROR, IO_TYPES

log = logging.getLogger(__name__)

# The debugger runs the model layer by layer against float on this many calibration images.
DEBUG_IMAGES = 32
# At most this many layers are kept in float (the worst ones), so a model that int8 hurts
# everywhere stays mostly int8 and fails the export's accuracy gate instead of silently
# becoming a float model.
MAX_FLOAT_LAYERS = 8


@dataclass(frozen=True)
class QuantizationConfig:
    precision: str  # fp32 | fp16 | dynamic | int8
    io: str = "float"  # int8 | uint8 | float: model input/output type (int8 precision only)
    float_ops: tuple[str, ...] = ()  # int8: TFLite ops kept in float (selective quantization)
    # int8: also keep in float every layer whose int8 output error, RMSE / quantization step,
    # measured by LiteRT's QuantizationDebugger on calibration images, exceeds this (None: none).
    float_error: float | None = None

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
    def for_int8_mixed(cls, role: str, float_error: float | None = FLOAT_ERROR) -> QuantizationConfig:
        """int8 where it holds, float where int8 measurably hurts; float I/O.

        - A classifier's head (dense layers + softmax) stays float: a full-integer classifier
          rounds its softmax output to 1/256 steps and its head's weights to int8, which costs
          agreement with Keras; the head is a few thousand MACs.
        - Every layer whose int8 output error exceeds ``float_error`` quantization steps stays
          float (see :data:`FLOAT_ERROR`).
        """
        ops = ("FULLY_CONNECTED", "SOFTMAX") if role == "classifier" else ()
        return cls("int8", "float", ops, float_error)

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


    def convert(self, converter, calibration: np.ndarray | None = None) -> tuple[bytes, list[dict]]:
        """Apply the settings and convert. Returns the flatbuffer and the layers kept in float
        (name, op, measured error in quantization steps).

        int8 with ``float_ops`` or ``float_error`` goes through LiteRT's selective quantization:
        the QuantizationDebugger measures every layer's int8 error on calibration images, then
        quantizes with those ops and layers deny-listed."""
        import tensorflow as tf

        self.apply(converter, calibration)
        if not self.float_ops and self.float_error is None:
            return converter.convert(), []
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
        ops = list(self.float_ops) or None
        debug_data = calibration[:DEBUG_IMAGES] if self.float_error is not None else calibration[:1]
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=_representative(debug_data),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=ops))
        layers: list[dict] = []
        if self.float_error is not None:
            debugger.run()
            layers = worst_layers(debugger, self.float_error)
            if layers:
                log.info("keeping %d layer(s) in float: %s", len(layers), layers)
                debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_ops=ops, denylisted_nodes=[x["tensor"] for x in layers])
        return debugger.get_nondebug_quantized_model(), layers


def worst_layers(debugger, threshold: float, limit: int = MAX_FLOAT_LAYERS) -> list[dict]:
    """The layers whose int8 output error (RMSE in quantization steps) exceeds ``threshold``,
    worst first, from a QuantizationDebugger that has run."""
    buf = _io.StringIO()
    debugger.layer_statistics_dump(buf)
    buf.seek(0)
    found = []
    for row in csv.DictReader(buf):
        scale, mse = float(row["scale"] or 0), float(row["mean_squared_error"] or 0)
        if scale > 0 and np.isfinite(mse):
            error = float(np.sqrt(mse) / scale)
            if error > threshold:
                found.append({"tensor": row["tensor_name"], "op": row["op_name"], "error_steps": round(error, 3)})
    found.sort(key=lambda x: -x["error_steps"])
    return found[:limit]


def _representative(calibration: np.ndarray):
    def gen() -> Iterable[list[np.ndarray]]:
        for i in range(len(calibration)):
            yield [calibration[i : i + 1].astype(np.float32)]

    return gen
