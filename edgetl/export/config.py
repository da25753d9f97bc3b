"""What an export is asked to do (TensorFlow-free: the CLI reads its defaults from here).

:class:`ExportConfig` is built once (from the CLI or from Python) and frozen; its
:meth:`~ExportConfig.plans` turn the requested targets into one :class:`Plan` per format x
precision, read from the format table: which files it puts in the bundle, which roles it
converts, whether its head is re-fitted on its backbone's features, whether it is verified
against Keras and gated. The exporter walks the plans and never asks a format its name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError
from ..formats import FLOAT_ERROR, IO_TYPES, MODEL_ROLES, Format, parse_targets


@dataclass(frozen=True)
class Plan:
    """One export target (format x precision) and what the exporter does for it."""

    fmt: Format
    precision: str
    files: tuple[str, ...]  # the roles whose files go into the bundle
    convert: tuple[str, ...]  # the roles converted, in order (files, plus a backbone only for the re-fit)
    refit: bool  # the head is re-fitted on this precision's backbone features (calibrated precisions)
    verify: bool  # run against Keras on the validation photos
    gate: bool  # ... and refused when its accuracy drops more than max_drop (calibrated precisions)

    @property
    def from_head(self) -> bool:
        return self.fmt.from_head


@dataclass(frozen=True)
class ExportConfig:
    targets: tuple[str, ...] = ("tflite:fp32", "tflite:int8")
    roles: tuple[str, ...] = MODEL_ROLES
    io: str = "int8"  # int8 | uint8 | float: I/O type of full-integer TFLite files
    calibration_images: int = 200  # training photos that calibrate int8 (balanced over classes)
    verify: bool = True
    max_drop: float = 1.0  # int8 files: most accuracy points below Keras on the validation photos
    replay_per_class: int = 256  # training photos per class whose backbone features ship for retraining
    make_zip: bool = False
    force: bool = False
    refit_head: bool = True  # calibrated files: re-fit the head on their backbone's features
    max_classes: int | None = None  # tflite-trainable: output slots (default: the classes + 8)
    trainable_lr: float = 0.01  # tflite-trainable: SGD learning rate baked into train()
    trainable_l2: float = 1e-4  # tflite-trainable: L2 baked into train()
    threads: int | None = None  # runtime threads while verifying
    # int8 TFLite: full-integer files (every op int8, I/O per ``io``; for accelerators that need
    # one). By default int8 files are mixed: a classifier's head and the layers int8 hurts most
    # stay float (quantization.QuantizationConfig.for_int8_mixed), with float I/O.
    full_integer: bool = False
    float_error: float | None = FLOAT_ERROR  # mixed int8: layers above this error stay float
    opset: int = 17  # ONNX opset
    # Photos to verify (and gate) the files on, one folder per class: photos the head never saw.
    # Default: the run's validation split (which the default head was refitted on as well).
    val_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "roles", tuple(self.roles))
        for r in self.roles:
            if r not in MODEL_ROLES:
                raise ConfigError(f"unknown role {r!r}; expected 'classifier' and/or 'backbone'")
        if self.calibration_images < 1:
            raise ConfigError(f"calibration_images must be at least 1; received {self.calibration_images}")
        if self.io not in IO_TYPES:
            raise ConfigError(f"io must be one of {', '.join(IO_TYPES)}; received {self.io!r}")
        if self.replay_per_class < 0:
            raise ConfigError(f"replay_per_class must be 0 or more; received {self.replay_per_class}")
        if not self.plans():
            raise ConfigError("no export targets given; e.g. --format tflite:int8")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def plans(self) -> list[Plan]:
        out = []
        for fmt, precision in parse_targets(list(self.targets)):
            if fmt.from_head:
                out.append(Plan(fmt, precision, fmt.roles, (), refit=False, verify=False, gate=False))
                continue
            files = tuple(r for r in MODEL_ROLES if r in self.roles and r in fmt.roles)
            refit = self.refit_head and precision in fmt.calibrated
            convert = tuple(r for r in MODEL_ROLES if r in files or (r == "backbone" and refit))
            out.append(Plan(fmt, precision, files, convert, refit=refit, verify=self.verify,
                            gate=precision in fmt.calibrated))
        return out
