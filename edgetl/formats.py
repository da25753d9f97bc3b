"""The one table of export formats (TensorFlow-free).

``edgetl export`` (argument checks, dispatch), ``edgetl bench`` (its rows) and the bundle
reader (runtime per file) all read this table; nothing else lists formats or precisions.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    default_precisions: tuple[str, ...]
    runtime: str  # the runtime that loads it: "litert" or "onnxruntime"
    module: str  # the exporter module; each has export(source, path, precision, config)
    roles: tuple[str, ...]
    description: str
    from_head: bool = False  # converts the head's arrays, not a Keras model
    file_format: str | None = None  # the manifest's format of its files (default: the name)
    calibrated: tuple[str, ...] = ()  # precisions calibrated on photos: their head is re-fitted, their accuracy gated


FORMATS: dict[str, Format] = {
    "tflite": Format(
        name="tflite",
        suffix=".tflite",
        precisions=("fp32", "fp16", "dynamic", "int8"),
        default_precisions=("fp32", "int8"),
        runtime="litert",
        module="edgetl.export.tflite",
        roles=("classifier", "backbone"),
        description="TFLite flatbuffer for LiteRT: float32, float16 weights, dynamic-range int8 weights, "
        "or int8 calibrated on training photos (mixed: the layers int8 measurably hurts stay float; "
        "--full-int8 for full integer)",
        calibrated=("int8",),
    ),
    "onnx": Format(
        name="onnx",
        suffix=".onnx",
        precisions=("fp32", "int8"),
        default_precisions=("fp32",),
        runtime="onnxruntime",
        module="edgetl.export.onnx",
        roles=("classifier", "backbone"),
        description="ONNX for ONNX Runtime: float32 (tf2onnx), or int8 QDQ static quantization calibrated "
        "on training photos",
        calibrated=("int8",),
    ),
    "tflite-trainable": Format(
        name="tflite-trainable",
        suffix=".tflite",
        precisions=("fp32",),
        default_precisions=("fp32",),
        runtime="litert",
        module="edgetl.export.trainable",
        roles=("trainable_head",),
        description="head-only TFLite model with infer/train/save/restore signatures, TFLite builtins only "
        "(trains on a phone in stock LiteRT)",
        from_head=True,
        file_format="tflite",
    ),
}

# The roles of model files: made from the run's Keras models (in conversion order: a re-fitted
# head needs its backbone file first), and every role a format's files have.
MODEL_ROLES = ("backbone", "classifier")
FILE_ROLES = tuple(dict.fromkeys(r for f in FORMATS.values() for r in f.roles))
assert all(set(f.roles) <= set(MODEL_ROLES) for f in FORMATS.values() if not f.from_head)

# Device preference when a bundle holds several files of one role.
PREFERENCE = (("tflite", "int8"), ("tflite", "dynamic"), ("tflite", "fp16"), ("tflite", "fp32"),
              ("onnx", "int8"), ("onnx", "fp32"))

IO_TYPES = ("int8", "uint8", "float")
# Mixed int8 TFLite: a layer is kept in float when the RMSE of its int8 output against the
# float one exceeds this many quantization steps (the threshold of TensorFlow's quantization-
# debugger guide). On MobileNetV2 1.0/224 (flowers run) two layers pass it: the first depthwise
# convolution (1.33 steps) and block 2's (0.75); next 0.55. Backbone feature cosine to Keras on
# flowers/test: full integer 0.972 (min 0.903), mixed 0.986 (min 0.953); see docs/bundle.md.
FLOAT_ERROR = 0.7
# The runtimes, by the names the table gives them; LiteRT's predecessor package is still accepted.
LITERT = FORMATS["tflite"].runtime
ONNXRUNTIME = FORMATS["onnx"].runtime
TFLITE_RUNTIME = "tflite_runtime"  # runs the same .tflite files as LiteRT
RUNTIME_OF_BACKEND = {LITERT: LITERT, ONNXRUNTIME: ONNXRUNTIME, TFLITE_RUNTIME: LITERT}
# Every runtime and precision the table names, in table order (CLI choices come from here).
BACKENDS = tuple(dict.fromkeys(f.runtime for f in FORMATS.values()))
PRECISIONS = tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.precisions))


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def get_format(name: str) -> Format:
    key = name.strip().lower()
    if key in FORMATS:
        return FORMATS[key]
    raise ConfigError(f"unknown format {name!r}{_suggest(key, FORMATS)} Known formats: {', '.join(FORMATS)}")


def parse_target(spec: str) -> list[tuple[Format, str]]:
    """'tflite:int8' -> [(tflite, int8)]; 'tflite' -> its default precisions; 'onnx:all' -> all."""
    name, _, precision = spec.partition(":")
    fmt = get_format(name)
    if not precision:
        return [(fmt, p) for p in fmt.default_precisions]
    if precision == "all":
        return [(fmt, p) for p in fmt.precisions]
    out = []
    for p in precision.split("+"):
        p = p.strip().lower()
        if p not in fmt.precisions:
            raise ConfigError(
                f"format {fmt.name!r} has no precision {p!r}{_suggest(p, fmt.precisions)} "
                f"Its precisions: {', '.join(fmt.precisions)}"
            )
        out.append((fmt, p))
    return out


def parse_targets(specs: list[str] | tuple[str, ...]) -> list[tuple[Format, str]]:
    seen: list[tuple[Format, str]] = []
    for spec in specs:
        for t in parse_target(spec):
            if t not in seen:
                seen.append(t)
    return seen


def file_format(fmt: Format) -> str:
    """The format a bundle's manifest gives this format's files (a trainable head is a .tflite)."""
    return fmt.file_format or fmt.name


def file_name(role: str, fmt: Format, precision: str) -> str:
    return f"{role}_{precision}{fmt.suffix}"


def runs_format(backend: str | None, fmt: str) -> bool:
    """Whether ``backend`` (None/"auto": any) runs files of format ``fmt`` (a name in FORMATS)."""
    if backend in (None, "auto"):
        return True
    f = FORMATS.get(fmt)
    return f is not None and RUNTIME_OF_BACKEND.get(backend) == f.runtime
