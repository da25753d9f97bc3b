"""After conversion, read the file back and check it is what was asked for.

A float model labelled int8 is a known failure of other tools; here the tensor types of the
flatbuffer (or the ONNX graph) are counted, and a mismatch is an :class:`ExportError`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import ExportError
from ..runtime import OnnxRunner, TFLiteRunner

FLEX_PREFIX = "Flex"


def tflite_summary(path: Path) -> dict:
    runner = TFLiteRunner(path, threads=1, inspect=True)
    ops = runner.op_names()
    return {
        "input": runner.input.to_dict(),
        "output": runner.output.to_dict(),
        "tensor_dtypes": dict(Counter(runner.tensor_dtypes())),
        "ops": dict(Counter(ops)),
        "flex_or_custom_ops": sorted({o for o in ops if o.startswith(FLEX_PREFIX) or o == "CUSTOM"}),
    }


def check_tflite(path: str | Path, precision: str, io: str = "float", float_ops: tuple[str, ...] = (),
                 mixed: bool = False) -> dict:
    """Check tensor types against the precision; return the file's summary for the manifest."""
    path = Path(path)
    s = tflite_summary(path)
    dt = s["tensor_dtypes"]
    n_f32, n_f16, n_i8, n_u8 = dt.get("float32", 0), dt.get("float16", 0), dt.get("int8", 0), dt.get("uint8", 0)
    want_io = {"float": "float32", "int8": "int8", "uint8": "uint8"}[io]
    problems = []
    if s["flex_or_custom_ops"]:
        problems.append(f"it uses Flex/custom ops {s['flex_or_custom_ops']} that stock LiteRT cannot run")
    if s["input"]["dtype"] != want_io or s["output"]["dtype"] != want_io:
        problems.append(f"its input/output are {s['input']['dtype']}/{s['output']['dtype']}, expected {want_io}")
    if precision == "fp32" and (n_i8 or n_f16 or n_u8):
        problems.append(f"it holds {n_i8} int8, {n_u8} uint8 and {n_f16} float16 tensors; expected only float32")
    elif precision == "fp16" and not n_f16:
        problems.append(f"it holds no float16 tensors ({n_f32} float32); expected float16 weights")
    elif precision == "dynamic" and not (n_i8 and n_f32):
        problems.append(f"it holds {n_i8} int8 and {n_f32} float32 tensors; expected int8 weights with float activations")
    elif precision == "int8" and (float_ops or mixed):
        # Mixed int8 (a float head, layers kept float): int8 convolutions, float ops only where
        # asked, between QUANTIZE/DEQUANTIZE.
        float_kinds = {"FULLY_CONNECTED", "SOFTMAX", "DEQUANTIZE", "QUANTIZE"} | set(float_ops)
        int8_kinds = {"CONV_2D", "DEPTHWISE_CONV_2D"}
        if not int8_kinds & set(s["ops"]) or "DEQUANTIZE" not in s["ops"] or not n_i8:
            problems.append(f"its ops {sorted(s['ops'])} are not int8 convolutions with float parts")
        unexpected = set(s["ops"]) - float_kinds - int8_kinds - {"ADD", "MEAN", "RESHAPE", "PAD", "RELU6", "MUL"}
        if unexpected:
            problems.append(f"it has unexpected ops {sorted(unexpected)}")
        s["float_ops"] = list(float_ops)
    elif precision == "int8":
        # Full-integer: float32 may appear only at a float input/output boundary.
        allowed = 2 if io == "float" else 0
        if n_f32 > allowed:
            problems.append(f"it holds {n_f32} float32 tensors (at most {allowed} allowed); expected a full-integer model")
        if not (n_i8 or n_u8):
            problems.append("it holds no int8 tensors")
    if problems:
        raise ExportError(f"{path.name} was asked to be TFLite {precision} (io {io}) but " + "; ".join(problems))
    s["precision"] = precision
    return s


def check_onnx(path: str | Path, precision: str) -> dict:
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    int8_inits = sum(1 for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    n_q = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0) + ops.get("QLinearConv", 0)
    problems = []
    if precision == "fp32" and (n_q or int8_inits):
        problems.append(f"it has {n_q} quantize/dequantize nodes and {int8_inits} int8 initializers; expected none")
    if precision == "int8" and not (n_q and int8_inits):
        problems.append(f"it has {n_q} quantize/dequantize nodes and {int8_inits} int8 initializers; expected int8 weights")
    if problems:
        raise ExportError(f"{path.name} was asked to be ONNX {precision} but " + "; ".join(problems))
    runner = OnnxRunner(path, threads=1)
    return {
        "input": runner.input.to_dict(),
        "output": runner.output.to_dict(),
        "ops": dict(ops),
        "int8_initializers": int8_inits,
        "opset": int(model.opset_import[0].version) if model.opset_import else None,
        "precision": precision,
    }
