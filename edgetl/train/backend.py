"""What training runs on: the Keras backend (TensorFlow, JAX or PyTorch), its accelerators, how
the work is spread over them, and the numeric policy.

Training code is plain Keras 3 and imports no backend itself; the few places that need one ask
here. ``KERAS_BACKEND`` picks the backend (the command line's default is ``tensorflow``).
TensorFlow is then imported only by the TensorFlow backend itself, by export, and to convert the
backbone to LiteRT for faster features (which a JAX or PyTorch run skips unless the file exists).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError

log = logging.getLogger("edgetl")

BACKENDS = ("tensorflow", "jax", "torch")


def name() -> str:
    """The Keras backend in use (imports Keras)."""
    import keras

    return keras.backend.backend()


def wanted() -> str:
    """The backend Keras will use, without importing it: ``KERAS_BACKEND``, else the "backend" of
    Keras' config file (``$KERAS_HOME/keras.json``, default ``~/.keras``), else tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            chosen = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        chosen = None
    return chosen if isinstance(chosen, str) and chosen else "tensorflow"


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


# Keras 3's fit under tf.distribute.MultiWorkerMirroredStrategy fails (keras-team/keras#20585,
# tensorflow/tensorflow#72388; here: "Attempt to convert a value (PerReplica...)" in fit, and
# predict_on_batch returning every worker's rows).
MULTIWORKER_TF = ("--distribute multiworker runs under JAX (expected KERAS_BACKEND=jax, `pip install "
                  "'edgetl[train-jax]'`; received the tensorflow backend): Keras 3 cannot train under TensorFlow's "
                  "MultiWorkerMirroredStrategy (keras-team/keras#20585); under TensorFlow use --distribute mirrored "
                  "for the devices of one machine")


def placement(mode: str, backend: str | None = None) -> Placement:
    """``--distribute``: "none" (one device), "mirrored" (every local device: TensorFlow's
    MirroredStrategy, JAX's ``keras.distribution.DataParallel``), "multiworker" (several
    machines, under JAX: ``jax.distributed``, from its environment variables or a cluster it
    detects; refused under TensorFlow, whose multi-worker strategy Keras 3 cannot train with)."""
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
            raise ConfigError(MULTIWORKER_TF)
        return Placement(mode, backend, int(strategy.num_replicas_in_sync), [], strategy)
    if backend == "jax":
        import jax
        import keras

        if mode == "multiworker":
            keras.distribution.initialize()  # jax.distributed: coordinator, process count and id from the env
            if jax.process_count() > 1:
                _native_stdout_to_stderr()
        devices = keras.distribution.list_devices()
        # edgetl's batches are already this process's share (finetune._batches): no tf.data sharding
        dist = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        keras.distribution.set_distribution(dist)
        log.info("data parallel over %d devices (%d processes)", len(devices), jax.process_count())
        return Placement(mode, backend, len(devices), [str(d) for d in devices])
    raise ConfigError(f"--distribute {mode} needs the tensorflow or jax Keras backend; this run uses {backend} "
                      f"(set KERAS_BACKEND=jax or tensorflow)")


def _native_stdout_to_stderr() -> None:
    """Gloo (JAX's collectives between CPU processes) prints to the process's standard output;
    native writes go to standard error from here on, Python's ``sys.stdout`` (``--json``) keeps
    the real one."""
    sys.stdout.flush()
    keep = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(keep, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")


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


def processes() -> tuple[int, int]:
    """(this process's index, number of processes) of a JAX run spread over several machines
    (``--distribute multiworker``); (0, 1) otherwise. Each process feeds its own share of every
    batch: ``keras.distribution`` under JAX takes a process's input as its part of the global batch."""
    if name() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def _tf_replicas(model) -> int:
    """Replicas of the TensorFlow strategy ``model`` was built under (MirroredStrategy over
    several GPUs), else 1."""
    if "tensorflow" not in sys.modules or name() != "tensorflow":
        return 1
    strategy = getattr(model, "distribute_strategy", None)
    return int(strategy.num_replicas_in_sync) if strategy is not None else 1


_LOCAL = weakref.WeakKeyDictionary()  # model -> its jitted forward pass on this process's device


def predict(model, x: np.ndarray) -> np.ndarray:
    """``model.predict_on_batch(x)`` as float32 NumPy, ``x`` being the whole batch.

    Under a TensorFlow strategy with several replicas Keras' predict_on_batch returns every
    replica's answer to the whole ``x``, stacked; the model is then called directly (on its
    primary weights). Over several JAX processes Keras' own predict would take ``x`` as this
    process's share of a global batch and could not gather the answer; the model then runs on
    this process's copy of its weights (replicated on every device by data parallelism) on its
    first local device."""
    if _tf_replicas(model) > 1:  # Keras' predict_on_batch gives every replica's answer to the whole x, stacked
        return np.asarray(model(x, training=False), np.float32)
    if processes()[1] == 1:
        return np.asarray(model.predict_on_batch(x), np.float32)
    import jax

    def local(v):
        a = v.value
        return a.addressable_data(0) if isinstance(a, jax.Array) and not a.is_fully_addressable else a

    fn = _LOCAL.get(model)
    if fn is None:
        fn = _LOCAL[model] = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
    out = fn([local(v) for v in model.trainable_variables], [local(v) for v in model.non_trainable_variables],
             jax.device_put(np.asarray(x), jax.local_devices()[0]))
    return np.asarray(out, np.float32)


def check_same_everywhere(text: Callable[[], str], what: str) -> None:
    """Over several processes, that every process has the same ``text()`` (e.g. the list of photos
    and labels): data parallelism with different data on each machine would train on a mixture
    that no single folder describes, or wait forever."""
    rank, nproc = processes()
    if nproc == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text().encode()).digest()[:8], np.int64)
    seen = np.asarray(multihost_utils.process_allgather(digest)).reshape(nproc)
    differ = [i for i in range(nproc) if seen[i] != seen[0]]
    if differ:
        raise ConfigError(f"--distribute multiworker: process(es) {differ} see different {what} than process 0 "
                          f"(this is process {rank}); every machine needs the same folders and options")
