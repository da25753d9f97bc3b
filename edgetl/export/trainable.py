"""``tflite-trainable``: a head-only TFLite model that trains itself in stock LiteRT.

Signatures (what an Android app calls with ``Interpreter.runSignature``):

* ``infer(feature[N, D]) -> probabilities[N, K]``
* ``train(feature[N, D], label[N] int32) -> loss``: one SGD step on the batch
* ``save() -> W0, b0, ..., mask``
* ``restore(W0, b0, ..., mask) -> ok``

The gradients are written out by hand (softmax cross-entropy through dense + ReLU layers),
so the graph converts with ``TFLITE_BUILTINS`` alone: the ``GradientTape`` form pulls in Flex
ops (``BroadcastGradientArgs``, ``ReluGrad``) that stock LiteRT refuses. Variables are plain
``tf.Variable`` on a ``tf.Module`` (Keras 3 variables come out uninitialised). The output has
``K = max_classes`` slots; slots whose ``mask`` is 0 get a logit of -1e9 until a class is
assigned to them. The step is the same as :mod:`edgetl.head.fit` with
``optimizer='sgd', balance=False``, so the two trainers can be compared number for number.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..convert.source import ExportSource
from ..errors import ConfigError, ExportError
from ..fileio import atomic_write_bytes
from ..head.arrays import Layers, pad_to_slots
from ..head.tflite import TFLiteTrainableHead
from .config import ExportConfig

SIGNATURES = ("infer", "train", "save", "restore")


def pad_layers(layers: Layers, max_classes: int) -> tuple[Layers, np.ndarray]:
    if max_classes < layers[-1][0].shape[1]:
        raise ConfigError(f"max_classes ({max_classes}) is smaller than the number of classes "
                          f"({layers[-1][0].shape[1]})")
    return pad_to_slots(layers, max_classes)


def build_module(layers: Layers, max_classes: int, learning_rate: float, l2: float):
    import tensorflow as tf

    padded, mask0 = pad_layers(layers, max_classes)
    n_layers = len(padded)
    dim = padded[0][0].shape[0]
    lr = float(learning_rate)
    l2c = float(l2)
    k = int(max_classes)

    class TrainableHead(tf.Module):
        def __init__(self):
            super().__init__()
            self.ws = [tf.Variable(w, name=f"W{i}") for i, (w, _) in enumerate(padded)]
            self.bs = [tf.Variable(b, name=f"b{i}") for i, (_, b) in enumerate(padded)]
            self.mask = tf.Variable(mask0, name="mask")

        def _forward(self, x):
            acts = [x]
            h = x
            for i in range(n_layers):
                z = tf.matmul(h, self.ws[i]) + self.bs[i]
                if i < n_layers - 1:
                    h = tf.nn.relu(z)
                    acts.append(h)
                else:
                    z = tf.where(self.mask > 0, z, tf.fill(tf.shape(z), -1e9))
                    return acts, tf.nn.softmax(z)

        @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32, name="feature")])
        def infer(self, feature):
            return {"probabilities": self._forward(feature)[1]}

        @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32, name="feature"),
                                      tf.TensorSpec([None], tf.int32, name="label")])
        def train(self, feature, label):
            acts, p = self._forward(feature)
            onehot = tf.one_hot(label, k)
            n = tf.cast(tf.shape(feature)[0], tf.float32)
            loss = -tf.reduce_sum(onehot * tf.math.log(tf.maximum(p, 1e-12))) / n
            for w in self.ws:
                loss += 0.5 * l2c * tf.reduce_sum(w * w)
            delta = (p - onehot) / n
            grads = []
            for i in range(n_layers - 1, -1, -1):
                gw = tf.matmul(acts[i], delta, transpose_a=True) + l2c * self.ws[i]
                gb = tf.reduce_sum(delta, axis=0)
                grads.append((i, gw, gb))
                if i > 0:
                    delta = tf.matmul(delta, self.ws[i], transpose_b=True) * tf.cast(acts[i] > 0, tf.float32)
            for i, gw, gb in grads:
                self.ws[i].assign_sub(lr * gw)
                self.bs[i].assign_sub(lr * gb)
            return {"loss": loss}

        @tf.function(input_signature=[])
        def save(self):
            out = {}
            for i in range(n_layers):
                out[f"W{i}"] = tf.identity(self.ws[i])
                out[f"b{i}"] = tf.identity(self.bs[i])
            out["mask"] = tf.identity(self.mask)
            return out

        @tf.function(input_signature=[s for i, (w, b) in enumerate(padded)
                                      for s in (tf.TensorSpec(w.shape, tf.float32, name=f"W{i}"),
                                                tf.TensorSpec(b.shape, tf.float32, name=f"b{i}"))]
                     + [tf.TensorSpec([k], tf.float32, name="mask")])
        def restore(self, *args):
            for i in range(n_layers):
                self.ws[i].assign(args[2 * i])
                self.bs[i].assign(args[2 * i + 1])
            self.mask.assign(args[-1])
            return {"ok": tf.constant(1, tf.int32)}

    return TrainableHead()


def custom_ops(flatbuffer: bytes) -> list[str]:
    """Names of the custom (including Flex) operator codes in a TFLite flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i).CustomCode()
        if code:
            names.append(code.decode() if isinstance(code, bytes) else str(code))
    return names


def export(source: ExportSource, path: Path, precision: str, options: ExportConfig) -> dict:

    import tensorflow as tf

    if precision != "fp32":
        raise ExportError(f"tflite-trainable is float32 only; received precision {precision!r}")
    layers = source.head
    if layers is None or len(layers) > 2:
        raise ExportError("tflite-trainable supports softmax regression or one hidden layer; "
                          f"this head has {0 if layers is None else len(layers) - 1} hidden layers")
    max_classes = options.max_classes or layers[-1][0].shape[1]
    module = build_module(layers, max_classes, options.trainable_lr, options.trainable_l2)
    saved = source.workdir / "saved_model_trainable"
    tf.saved_model.save(module, str(saved), signatures={name: getattr(module, name).get_concrete_function()
                                                        for name in SIGNATURES})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(SIGNATURES))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    try:
        flatbuffer = converter.convert()
    except Exception as exc:
        raise ExportError(f"conversion of the trainable head failed: {str(exc)[:400]}") from None
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    flex = custom_ops(flatbuffer)
    if flex:
        raise ExportError(f"the trainable head contains custom/Flex ops {flex}; stock LiteRT cannot run it")
    atomic_write_bytes(path, flatbuffer)

    head = TFLiteTrainableHead(path, threads=1)  # loads in stock LiteRT, no Flex delegate
    missing = sorted(set(SIGNATURES) - set(head.signatures))
    if missing:
        raise ExportError(f"{path.name} lacks the signature(s) {missing}")
    saved_layers, mask = head.save()
    if not all(np.array_equal(a, b) for (a, _), (b, _) in zip(saved_layers, pad_layers(layers, max_classes)[0])):
        raise ExportError(f"{path.name}: the weights read back with save() differ from the head it was built from")
    return {
        "signatures": {name: head.signatures[name] for name in SIGNATURES},
        "custom_ops": [],
        "builtins_only": True,
        "max_classes": int(max_classes),
        "live_slots": [int(i) for i in np.flatnonzero(mask)],
        "optimizer": {"name": "sgd", "learning_rate": options.trainable_lr, "l2": options.trainable_l2},
        "hidden_layers": len(layers) - 1,
        "input": {"name": "feature", "shape": [-1, int(layers[0][0].shape[0])], "dtype": "float32"},
        "output": {"name": "probabilities", "shape": [-1, int(max_classes)], "dtype": "float32"},
    }
