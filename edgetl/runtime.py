"""Run a .tflite or .onnx file without TensorFlow: LiteRT (``ai_edge_litert``, or the old
``tflite_runtime`` as a fallback) and ONNX Runtime behind one small interface.

Callers hand over the float32 input of :mod:`edgetl.preprocess`; a quantized (int8/uint8)
input is quantized here with the file's own scale and zero point, and a quantized output is
dequantized, so every model file answers in the same float units.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MissingDependencyError, ModelError
from .formats import LITERT, ONNXRUNTIME, TFLITE_RUNTIME, runs_format
from .preprocess import normalize

TFLITE_MAGIC = b"TFL3"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # with -1 / None for dynamic dimensions
    dtype: str  # numpy dtype name
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "uint8") and self.scale > 0

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": [(-1 if v is None else int(v)) for v in self.shape], "dtype": self.dtype}
        if self.quantized:
            d["scale"] = float(self.scale)
            d["zero_point"] = int(self.zero_point)
        return d


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    if not info.quantized:
        return x.astype(info.dtype, copy=False)
    lim = np.iinfo(info.dtype)
    q = np.round(x / np.float32(info.scale) + info.zero_point)
    return np.clip(q, lim.min, lim.max).astype(info.dtype)


def dequantize(y: np.ndarray, info: TensorInfo) -> np.ndarray:
    if info.quantized:
        return (y.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)
    return y.astype(np.float32, copy=False)


def default_threads() -> int:
    return os.cpu_count() or 1


def detect_format(path: str | Path) -> str:
    """'tflite' or 'onnx', from the file's first bytes (not only its name)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {str(p)!r} does not exist")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[4:8] == TFLITE_MAGIC:
        return "tflite"
    if p.suffix.lower() == ".onnx" or (head[:1] == b"\x08"):
        return "onnx"
    raise ModelError(
        f"{str(p)!r} is neither a TFLite flatbuffer (no 'TFL3' identifier; first bytes {head!r}) "
        f"nor an ONNX file; expected a .tflite or .onnx model"
    )


def litert_interpreter_class(backend: str | None):
    order = [LITERT, TFLITE_RUNTIME] if backend in (None, LITERT, "auto") else [backend]
    errors = []
    for name in order:
        try:
            if name == LITERT:
                from ai_edge_litert.interpreter import Interpreter
            elif name == TFLITE_RUNTIME:
                from tflite_runtime.interpreter import Interpreter  # type: ignore
            else:
                raise ModelError(f"unknown TFLite backend {name!r}; expected {LITERT!r} or {TFLITE_RUNTIME!r}")
            return name, Interpreter
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise MissingDependencyError(
        "no TFLite runtime is installed (" + "; ".join(errors) + "); install it with: pip install 'edgetl[device]' "
        "(ai-edge-litert)"
    )


@contextlib.contextmanager
def quiet_stderr():
    """Silence native writes to fd 2 (Python exceptions still carry their messages)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (some embedded hosts)
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ModelRunner:
    """One loaded model file. ``run(x)`` takes a float32 batch, returns a float32 batch."""

    format: str
    backend: str
    input: TensorInfo
    output: TensorInfo
    path: Path

    def run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def run_raw(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, pixels: np.ndarray, spec) -> np.ndarray:
        """uint8 RGB pixels -> this model's input, exactly ``quantize(normalize(pixels))``.

        For a quantized input, a per-channel 256-entry table built with the same float32
        operations replaces the float round trip (bit-identical, several times faster).
        """

        if not self.input.quantized:
            return normalize(pixels, spec).astype(self.input.dtype, copy=False)
        lut = getattr(self, "_lut", None)
        if lut is None or getattr(self, "_lut_spec", None) != spec:
            levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
            lut = quantize(normalize(levels, spec), self.input).T.copy()  # (3, 256)
            self._lut, self._lut_spec = lut, spec
        if (lut == lut[:1]).all():  # the same table for every channel: one gather
            return np.take(lut[0], pixels)
        src = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)  # output channel c reads input src[c]
        return np.stack([np.take(lut[c], pixels[..., src[c]]) for c in range(3)], axis=-1)

    def run_prepared(self, x: np.ndarray) -> np.ndarray:
        """Run an input made by :meth:`prepare`; float32 output."""
        return dequantize(self.run_raw(x), self.output)

    @property
    def input_size(self) -> int | None:
        shape = self.input.shape
        if len(shape) == 4 and shape[1] not in (None, -1):
            return int(shape[1])
        return None


class TFLiteRunner(ModelRunner):
    format = "tflite"

    def __init__(self, path: str | Path, threads: int | None = None, backend: str | None = None,
                 inspect: bool = False):
        """``inspect=True`` loads without the default (XNNPACK) delegate, so the op list is the file's own."""
        self.path = Path(path)
        self.backend, Interpreter = litert_interpreter_class(backend)
        kwargs = {}
        if inspect:
            module = importlib.import_module(Interpreter.__module__)
            kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with quiet_stderr():  # LiteRT's C++ logs "Created TensorFlow Lite XNNPACK delegate" on fd 2
                self.interp = Interpreter(model_path=str(self.path), num_threads=threads or default_threads(), **kwargs)
                self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"LiteRT cannot load {str(self.path)!r}: {exc}") from None
        ins = self.interp.get_input_details()
        outs = self.interp.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelError(
                f"{str(self.path)!r} has {len(ins)} inputs and {len(outs)} outputs; expected one of each "
                "(use the signature API for multi-signature files)"
            )
        self._in, self._out = ins[0], outs[0]
        self.input = self._info(self._in)
        self.output = self._info(self._out)
        self._batch = int(self._in["shape"][0])

    @staticmethod
    def _info(d) -> TensorInfo:
        scale, zp = d.get("quantization", (0.0, 0))
        sig = d.get("shape_signature", d["shape"])
        return TensorInfo(d["name"], tuple(int(v) for v in sig), np.dtype(d["dtype"]).name, float(scale), int(zp))

    def _ensure_batch(self, n: int) -> bool:
        if n == self._batch:
            return True
        if self.input.shape[0] != -1:
            return False
        shape = list(self._in["shape"])
        shape[0] = n
        self.interp.resize_tensor_input(self._in["index"], shape)
        self.interp.allocate_tensors()
        self._batch = n
        return True

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        if not self._ensure_batch(len(x)):
            return np.concatenate([self.run_raw(x[i : i + 1]) for i in range(len(x))])
        self.interp.set_tensor(self._in["index"], np.ascontiguousarray(x))
        self.interp.invoke()
        return self.interp.get_tensor(self._out["index"]).copy()

    def run(self, x: np.ndarray) -> np.ndarray:
        return dequantize(self.run_raw(quantize(np.asarray(x, np.float32), self.input)), self.output)

    def op_names(self) -> list[str]:
        try:
            return [op["op_name"] for op in self.interp._get_ops_details()]
        except AttributeError:  # pragma: no cover - old runtimes
            return []

    def tensor_dtypes(self) -> list[str]:
        return [np.dtype(t["dtype"]).name for t in self.interp.get_tensor_details()]


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
    "tensor(int8)": "int8", "tensor(int64)": "int64", "tensor(int32)": "int32",
}


# ONNX Runtime's default int8 kernel on x86 CPUs without VNNI (AVX2 only) sums pairs of u8 x s8
# products in saturating 16-bit lanes, and an int8 MobileNetV2's features drift there (cosine to
# float 0.925 instead of 0.977 on flowers). This option makes it use its exact u8 x u8 kernel on
# such CPUs; measured: the int8 features under ``qemu-x86_64 -cpu Haswell`` are then bit-identical
# to an AVX-512 VNNI CPU's, and the option changes nothing on VNNI x86 (bit-identical) or ARM.
ONNX_SESSION_CONFIG = {"session.x64quantprecision": "1"}


class OnnxRunner(ModelRunner):
    format = "onnx"
    backend = ONNXRUNTIME

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError(
                f"ONNX Runtime is not installed ({exc}); install it with: pip install 'edgetl[device]'"
            ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        for key, value in ONNX_SESSION_CONFIG.items():
            opts.add_session_config_entry(key, value)
        try:
            # From the file's bytes (the ones a bundle hashed): a model that points at external data
            # files beside it cannot load them, so nothing unlisted is ever read.
            model = self.path.read_bytes()
            self.session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {str(self.path)!r}: {str(exc)[:300]}") from None
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelError(f"{str(self.path)!r} has {len(ins)} inputs and {len(outs)} outputs; expected one of each")
        self.input = TensorInfo(ins[0].name, tuple(v if isinstance(v, int) else -1 for v in ins[0].shape),
                                _ORT_TYPES.get(ins[0].type, ins[0].type))
        self.output = TensorInfo(outs[0].name, tuple(v if isinstance(v, int) else -1 for v in outs[0].shape),
                                 _ORT_TYPES.get(outs[0].type, outs[0].type))
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output.name], {self.input.name: np.ascontiguousarray(x)})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        return dequantize(self.run_raw(quantize(np.asarray(x, np.float32), self.input)), self.output)


def open_model(path: str | Path, threads: int | None = None, backend: str | None = None) -> ModelRunner:
    """Load a .tflite (LiteRT) or .onnx (ONNX Runtime) file."""
    fmt = detect_format(path)
    if fmt == "tflite":
        if not runs_format(backend, "tflite"):
            raise ModelError(f"{str(path)!r} is a TFLite file; backend {backend!r} cannot run it")
        return TFLiteRunner(path, threads, backend)
    if not runs_format(backend, "onnx"):
        raise ModelError(f"{str(path)!r} is an ONNX file; backend {backend!r} cannot run it (use {ONNXRUNTIME!r})")
    return OnnxRunner(path, threads)


def run_batched(runner: ModelRunner, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else np.zeros((0,))
