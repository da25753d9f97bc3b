"""ONNX export: fp32 with tf2onnx, int8 with ONNX Runtime static QDQ quantization.

Labels and preprocessing go into the model's ``metadata_props``. int8 is static QDQ, calibrated
like TFLite (ONNX Runtime's dynamic int8 runs slower than fp32 on a CPU).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..convert.checks import check_onnx
from ..convert.source import ExportSource
from ..errors import ExportError
from ..fileio import atomic_write_bytes
from ..runtime import ONNX_SESSION_CONFIG
from .config import ExportConfig

log = logging.getLogger("edgetl")


def int8_recipe() -> dict:
    """The int8 recipe: S8S8 (int8 activations and weights; weights per channel, QDQ, MinMax).

    On x86 CPUs without VNNI (AVX2 only) ONNX Runtime's default int8 kernel saturates and the
    features drift; the session option in ``edgetl.runtime.ONNX_SESSION_CONFIG`` makes it exact
    there (bit-identical to a VNNI CPU). edgetl's runner sets it; the file's metadata and its
    manifest entry (``cpu_notes``, ``onnxruntime_session_config``) tell other users to.
    """
    from onnxruntime.quantization import QuantType

    return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8}


AVX2_NOTE = ("x86 CPUs without VNNI (AVX2 only): run with the ONNX Runtime session option "
             "session.x64quantprecision=1 (edgetl does). Without it ONNX Runtime's int8 kernel saturates there and "
             "the features drift (cosine to float 0.925 instead of 0.977 on flowers); with it the outputs are "
             "bit-identical to an AVX-512 VNNI CPU's")


def _head_nodes(model) -> list[str]:
    """The classifier's head: every node after the backbone's last global average pool."""
    names = [n.name for n in model.graph.node]
    pools = [i for i, n in enumerate(model.graph.node) if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    return names[pools[-1] + 1 :] if pools else []


def _with_metadata(model_proto, metadata: dict[str, str]):
    import onnx

    existing = {p.key: p.value for p in model_proto.metadata_props}
    existing.update(metadata)
    onnx.helper.set_model_props(model_proto, existing)
    return model_proto


def _float_model(source: ExportSource, opset: int):
    import tensorflow as tf
    import tf2onnx

    size = source.input_size
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)
    try:
        model_proto, _ = tf2onnx.convert.from_keras(source.model, input_signature=spec, opset=opset)
    except Exception as exc:
        raise ExportError(f"ONNX conversion of the {source.role} failed (tf2onnx): {str(exc)[:400]}") from None
    return model_proto


class _Calibration:
    def __init__(self, name: str, data: np.ndarray):
        self.name, self.data, self.i = name, data, 0

    def get_next(self):
        if self.i >= len(self.data):
            return None
        self.i += 1
        return {self.name: self.data[self.i - 1 : self.i].astype(np.float32)}

    def rewind(self):
        self.i = 0


def export(source: ExportSource, path: Path, precision: str, options: ExportConfig) -> dict:
    import onnx

    model_proto = _float_model(source, options.opset)
    if precision == "fp32":
        atomic_write_bytes(path, _with_metadata(model_proto, source.metadata).SerializeToString())
        return check_onnx(path, precision)
    if precision != "int8":
        raise ExportError(f"ONNX has no precision {precision!r}; expected fp32 or int8")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=source.workdir) as tmp:
        f32 = os.path.join(tmp, "float.onnx")
        pre = os.path.join(tmp, "pre.onnx")
        q = os.path.join(tmp, "int8.onnx")
        onnx.save(model_proto, f32)
        try:
            quant_pre_process(f32, pre, skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the plain model without it
            log.warning("ONNX Runtime's quant_pre_process failed on the %s (%s); quantizing it without "
                        "pre-processing", source.role, str(exc)[:200])
            pre = f32
        input_name = model_proto.graph.input[0].name
        float_head = _head_nodes(onnx.load(pre)) if source.role == "classifier" and not options.full_integer else []
        try:
            quantize_static(
                pre, q, _Calibration(input_name, source.calibration),
                quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=float_head, **int8_recipe(),
            )
        except Exception as exc:
            raise ExportError(f"ONNX Runtime int8 quantization of the {source.role} failed: {str(exc)[:400]}") from None
        quantized = onnx.load(q)
    metadata = {**source.metadata, "onnxruntime_session_config": json.dumps(ONNX_SESSION_CONFIG),
                "cpu_notes": AVX2_NOTE}
    atomic_write_bytes(path, _with_metadata(quantized, metadata).SerializeToString())
    info = check_onnx(path, precision)
    info["quantization"] = {**{k: str(v) for k, v in int8_recipe().items()}, "per_channel": True,
                            "calibration": "MinMax", "float_nodes": float_head}
    # Into the manifest entry: where the file needs the session option, and the option itself.
    info["entry"] = {"cpu_notes": AVX2_NOTE, "onnxruntime_session_config": dict(ONNX_SESSION_CONFIG)}
    return info
