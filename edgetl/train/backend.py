"""What training runs on: the Keras backend (TensorFlow, JAX or PyTorch), its accelerators, how
the work is spread over them, and the numeric policy.

Training code is plain Keras 3 and imports no backend itself; the few places that need one ask
here. ``KERAS_BACKEND`` picks the backend (the command line's default is ``tensorflow``).
TensorFlow is then imported only by the TensorFlow backend itself, by export, and to convert the
backbone to LiteRT for faster features (which a JAX or PyTorch run skips unless the file exists).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from ..errors import ConfigError

log = logging.getLogger("edgetl")

BACKENDS = ("tensorflow", "jax", "torch")


def name() -> str:
    """The Keras backend in use (imports Keras)."""
    import keras

    return keras.backend.backend()


def wanted() -> str:
    """The backend ``KERAS_BACKEND`` asks for, without importing Keras."""
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def accelerators(backend: str | None = None) -> list[str]:
    """The GPUs the backend sees (names), [] on a CPU."""
    backend = backend or name()
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


@dataclass
class Placement:
    """How a run is spread: ``scope()`` around building and compiling models, ``replicas`` the
    number of devices a batch is split over, ``describe`` for run.json."""

    mode: str
    backend: str
    replicas: int = 1
    devices: list[str] = field(default_factory=list)
    _scope: object = None

    def scope(self):
        return self._scope.scope() if self._scope is not None else contextlib.nullcontext()

    def describe(self) -> dict:
        return {"distribute": self.mode, "backend": self.backend, "replicas": self.replicas, "devices": self.devices}


def placement(mode: str, backend: str | None = None) -> Placement:
    """``--distribute``: "none" (one device), "mirrored" (every local device: TensorFlow's
    MirroredStrategy, JAX's ``keras.distribution.DataParallel``), "multiworker" (several
    machines: TF_CONFIG under TensorFlow; ``jax.distributed`` under JAX, from its environment
    variables or a cluster it detects)."""
    backend = backend or name()
    if backend == "jax":
        import keras

        keras.distribution.set_distribution(None)  # nothing left from an earlier run in this process
    if mode == "none":
        return Placement(mode, backend)
    if backend == "tensorflow":
        import tensorflow as tf

        if mode == "mirrored":
            strategy = tf.distribute.MirroredStrategy()
        else:
            if "TF_CONFIG" not in os.environ:
                raise ConfigError("distribute='multiworker' under TensorFlow needs the TF_CONFIG environment variable "
                                  "describing the cluster")
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return Placement(mode, backend, int(strategy.num_replicas_in_sync), [], strategy)
    if backend == "jax":
        import jax
        import keras

        if mode == "multiworker":
            keras.distribution.initialize()  # jax.distributed: coordinator, process count and id from the env
        devices = keras.distribution.list_devices()
        dist = keras.distribution.DataParallel(devices=devices)
        keras.distribution.set_distribution(dist)
        log.info("data parallel over %d devices (%d processes)", len(devices), jax.process_count())
        return Placement(mode, backend, len(devices), [str(d) for d in devices])
    raise ConfigError(f"--distribute {mode} needs the tensorflow or jax Keras backend; this run uses {backend} "
                      f"(set KERAS_BACKEND=jax or tensorflow)")


def mixed_precision(asked: bool, gpus: list[str]) -> str:
    """The Keras dtype policy: bfloat16 compute on a GPU when asked (float32 weights and head)."""
    import keras

    if asked and gpus:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        return "mixed_bfloat16"
    if asked:
        log.warning("mixed precision asked for but no GPU is visible; training in float32")
    keras.mixed_precision.set_global_policy("float32")
    return "float32"
