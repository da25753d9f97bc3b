"""Fine-tuning the top of the backbone, on its frozen trunk's cached activations.

The backbone is cut in two at a layer through which everything above passes (a "cut"): the
frozen trunk below it runs once per photo and view (a few views per photo: the photo, its mirror
image, random crops), and its activations are kept (float16, on disk); the top above it trains
with the head for many epochs on them, one random view per photo per epoch. On a 2-core CPU an
epoch over 1,200 photos then takes seconds instead of minutes, and on a GPU the same recipe runs
unchanged. BatchNorm layers stay frozen, in inference mode.

The recipe (chosen on the validation split of flowers/train only; README "Fine-tuning"):
1. start from the converged linear head (L-BFGS, as the head-only default);
2. train the top from ``block_10_expand`` (MobileNetV2's last three stages, Conv_1 and the head) with
   Adam, one warm-up epoch then cosine decay, label smoothing 0.1, balanced class weights;
3. early stopping on the validation loss keeps the best epoch;
4. like the head-only default, the final model is trained again on all photos (training and
   validation) from the pretrained backbone and the head solved on all of them, for that many
   epochs; the validation figures are those of the model trained on the training split;
5. unless the fine-tuned model classified no more validation photos correctly than the head
   alone (``fine_tune_keep`` "better"): the run is then the head alone.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import preprocess
from ..data import Sample
from ..errors import ConfigError, DataError
from ..head.arrays import Layers
from .backend import predict, processes
from .head import set_head_layers

log = logging.getLogger("edgetl")

Progress = Callable[..., None]

# Where --fine-tune starts training, per backbone (by measurement; README "Fine-tuning"); a
# backbone not listed trains its top FALLBACK_LAYERS layers.
DEFAULT_FROM = {"mobilenet_v2": "block_10_expand"}
FALLBACK_LAYERS = 30
LABEL_SMOOTHING = 0.1
WARMUP_EPOCHS = 1
CROP_AREA = (0.45, 1.0)  # random crops: share of the photo's area
CROP_RATIO = (3 / 4, 4 / 3)  # and aspect ratio


@dataclass
class Cut:
    """The backbone in two: ``bottom`` (image -> activations at the cut, frozen) and ``top``
    (activations -> pooled feature; its layers ARE the backbone's, so training them changes it)."""

    bottom: object
    top: object
    at: str  # the layer whose input the cut is
    start: str  # the first layer trained
    trained: int  # layers with weights that train


def _cut_candidates(model) -> list[int]:
    """Indices of layers whose (single) input carries everything the layers above need."""
    import keras

    out = []
    for i, layer in enumerate(model.layers[1:], start=1):
        if isinstance(layer.input, (list, tuple)):
            continue
        try:
            keras.Model(layer.input, model.output)
        except (ValueError, KeyError):
            continue
        out.append(i)
    return out


def start_index(model, backbone_name: str, fine_tune_from: str | None, fine_tune_layers: int) -> int:
    names = [layer.name for layer in model.layers]
    if fine_tune_from:
        if fine_tune_from not in names:
            close = difflib.get_close_matches(fine_tune_from, names, n=3)
            raise ConfigError(f"backbone {backbone_name} has no layer {fine_tune_from!r}"
                              + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
        return names.index(fine_tune_from)
    if fine_tune_layers:
        return max(1, len(names) - fine_tune_layers)
    default = DEFAULT_FROM.get(backbone_name)
    return names.index(default) if default in names else max(1, len(names) - FALLBACK_LAYERS)


def cut_backbone(model, start: int) -> Cut:
    """Cut below layer ``start`` (at the nearest cut at or below it) and make the layers from
    ``start`` up trainable, BatchNorm excepted."""
    import keras

    candidates = [i for i in _cut_candidates(model) if i <= start]
    at = candidates[-1] if candidates else 1
    layer = model.layers[at]
    bottom = keras.Model(model.input, layer.input, name="trunk")
    top = keras.Model(layer.input, model.output, name="top")
    model.trainable = True
    trained = 0
    for i, lay in enumerate(model.layers):
        lay.trainable = i >= start and not isinstance(lay, keras.layers.BatchNormalization)
        trained += int(lay.trainable and bool(lay.weights))
    return Cut(bottom, top, layer.name, model.layers[start].name, trained)


def render_views(data: bytes, name: str, size: int, views: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (views, size, size, 3): the photo as the model sees it, its mirror image, then random
    crops (area 45-100 %, aspect 3:4-4:3), each mirrored with probability 1/2."""
    img = preprocess.decode_image(data, name, size)
    base = preprocess.resize_rgb(img, size)
    out = [base] + ([base[:, ::-1]] if views > 1 else [])
    w, h = img.size
    for _ in range(views - len(out)):
        area = rng.uniform(*CROP_AREA) * w * h
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = min(w, max(1, round(math.sqrt(area * ratio)))), min(h, max(1, round(math.sqrt(area / ratio))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        px = preprocess.resize_rgb(img.crop((x0, y0, x0 + cw, y0 + ch)), size)
        out.append(px[:, ::-1] if rng.random() < 0.5 else px)
    return np.ascontiguousarray(np.stack(out))


class TrunkActivations:
    """The frozen trunk's activations for each photo and view, float16, in a file-backed array
    (a large folder does not need the memory); the file is removed by ``close``."""

    def __init__(self, bottom, samples: Sequence[Sample], spec: preprocess.Preprocessing, views: int, seed: int,
                 batch_size: int, progress: Progress | None = None, stage: str = "trunk",
                 directory: str | Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix=".trunk-", dir=directory))
        shape = tuple(int(d) for d in bottom.output.shape[1:])
        n = len(samples)
        path = self.dir / "acts.npy"
        try:
            self.acts = np.lib.format.open_memmap(path, "w+", np.float16, (n, views, *shape))
            # Reserve the blocks now: a full disk is then this error, not a crash (SIGBUS) mid-run.
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            need = n * views * int(np.prod(shape)) * 2
            shutil.rmtree(self.dir, ignore_errors=True)
            raise DataError(f"cannot keep the fine-tuning views in {self.dir.parent}: {exc.strerror or exc}; "
                            f"they need {need / 1e6:.0f} MB ({n} photos x {views} views); free space there or "
                            f"pass fewer --fine-tune-views") from None
        self.labels = np.array([s.label for s in samples], np.int64)
        rngs = [np.random.default_rng([seed, i]) for i in range(n)]  # per photo: the same views in any order

        def load(i):
            data, _ = preprocess.read_file_bytes(samples[i].path)
            return render_views(data, str(samples[i].path), spec.size, views, rngs[i])

        per = max(1, batch_size // views)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for s in range(0, n, per):
                idx = list(range(s, min(n, s + per)))
                try:
                    px = np.concatenate(list(pool.map(load, idx)))
                except DataError as exc:  # the features already read these photos: this is a change on disk
                    raise DataError(f"{exc} (the photo changed while training)") from None
                a = predict(bottom, preprocess.normalize(px, spec))
                self.acts[idx[0] : idx[-1] + 1] = a.reshape(len(idx), views, *shape).astype(np.float16)
                if progress:
                    progress(stage, idx[-1] + 1, n)
        self.acts.flush()

    def close(self) -> None:
        del self.acts
        shutil.rmtree(self.dir, ignore_errors=True)


def _batches(acts: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, seed: int, *,
             train: bool, weights: np.ndarray | None = None, replicas: int = 1):
    """A ``keras.utils.PyDataset``: in training, every epoch one random view of each photo in a
    new order; otherwise the first view (the photo itself) in order. Over several devices every
    batch divides among them: in training the last batch loses at most ``replicas - 1`` photos (chosen anew
    every epoch); otherwise it is padded with rows of weight 0. Over several processes each
    yields its own consecutive share of every batch (the same order everywhere: the same seed)."""
    import keras

    rank, nproc = processes()

    class ViewBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self._shuffle()

        def _shuffle(self):
            n = len(labels)
            self.order = self.rng.permutation(n) if train else np.arange(n)
            self.view = self.rng.integers(0, acts.shape[1], n) if train else np.zeros(n, np.int64)

        def __len__(self):
            return math.ceil(len(labels) / batch_size)

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size : (i + 1) * batch_size])
            w = weights[labels[idx]].astype(np.float32) if weights is not None else np.ones(len(idx), np.float32)
            if replicas > 1 and len(idx) % replicas:
                keep = len(idx) - len(idx) % replicas
                if train and keep:  # the photos left out are others in the next epoch's order
                    idx, w = idx[:keep], w[:keep]
                else:
                    pad = replicas - len(idx) % replicas
                    idx, w = np.concatenate([idx, idx[-1:].repeat(pad)]), np.concatenate([w, np.zeros(pad, np.float32)])
            if nproc > 1:  # replicas (all devices of all processes) is a multiple of nproc
                share = len(idx) // nproc
                idx, w = idx[rank * share : (rank + 1) * share], w[rank * share : (rank + 1) * share]
            x = acts[idx, self.view[idx]].astype(np.float32)
            y = np.eye(num_classes, dtype=np.float32)[labels[idx]]
            return (x, y, w) if weights is not None or replicas > 1 else (x, y)

        def on_epoch_end(self):
            if train:
                self._shuffle()

    return ViewBatches()


def _schedule(lr: float, steps_per_epoch: int, epochs: int):
    import keras

    warm = min(WARMUP_EPOCHS, max(epochs - 1, 0)) * steps_per_epoch
    total = max(epochs * steps_per_epoch, 1)
    if not warm:
        return keras.optimizers.schedules.CosineDecay(lr, total)
    return keras.optimizers.schedules.CosineDecay(0.0, total - warm, warmup_target=lr, warmup_steps=warm)


def _train_top(top, head, acts, labels, num_classes: int, weights, cfg, epochs: int, seed: int, val=None,
               progress: Progress | None = None, stage: str = "fine-tune", replicas: int = 1):
    """Adam with warm-up and cosine decay on ``top`` + ``head``; early stopping on ``val``."""
    import keras

    inp = keras.Input(acts.shape[2:], name="trunk_activations")
    model = keras.Model(inp, head(top(inp)), name="fine_tune")
    data = _batches(acts, labels, num_classes, cfg.batch_size, seed, train=True, weights=weights, replicas=replicas)
    model.compile(optimizer=keras.optimizers.Adam(_schedule(cfg.fine_tune_lr, len(data), epochs)),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=LABEL_SMOOTHING),
                  metrics=["accuracy"])

    class Bar(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if progress:
                progress(stage, epoch + 1, epochs)

    callbacks = [Bar()]
    if val is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                       restore_best_weights=True))
        val = _batches(val[0], val[1], num_classes, cfg.batch_size, seed, train=False, replicas=replicas)
    hist = model.fit(data, validation_data=val, epochs=epochs, verbose=0, callbacks=callbacks)
    return model, hist


def fine_tune(cfg, backbone, head, train_samples: Sequence[Sample], val_samples: Sequence[Sample],
              head_train: Layers, head_all: Layers | None, progress: Progress | None = None, replicas: int = 1,
              workdir: str | Path | None = None, head_val_accuracy: float | None = None):
    """Fine-tune ``backbone.model`` and ``head`` in place (see the module's recipe).

    ``head_train``: the converged head on the training photos (the start of the search on the
    validation photos); ``head_all``: on all photos (the start of the final fit), or None to keep
    the model trained on the training photos. ``replicas``: devices a batch is split over;
    ``workdir``: where the trunk's activations are kept while it runs (default: the temporary
    folder). ``head_val_accuracy``: the head alone's on the validation photos; with
    ``cfg.fine_tune_keep`` "better", a fine-tuned model that is not more accurate there is
    undone (the backbone's weights and ``head_all`` or ``head_train`` put back; summary "kept"
    False). Returns (summary, history rows, validation probabilities or None).
    """
    import keras

    from ..head.solver import balanced_class_weights

    num_classes = len(head_train[-1][1])
    model = backbone.model
    cut = cut_backbone(model, start_index(model, backbone.spec.name, cfg.fine_tune_from, cfg.fine_tune_layers))
    log.info("fine-tuning from %s (cut at %s): %d layers train", cut.start, cut.at, cut.trained)
    spec = backbone.preprocessing
    samples = list(train_samples) + list(val_samples)
    ntr = len(train_samples)
    trunk = TrunkActivations(cut.bottom, samples, spec, cfg.fine_tune_views, cfg.seed, cfg.batch_size, progress,
                             "fine-tune: trunk views", workdir)
    try:
        acts, labels = trunk.acts, trunk.labels
        balanced = cfg.class_weights == "balanced"
        start = [w.copy() for w in cut.top.get_weights()]
        rows: list[dict] = []
        has_val = len(val_samples) > 0
        set_head_layers(head, head_train)
        w_tr = balanced_class_weights(labels[:ntr], num_classes) if balanced else None
        _, hist = _train_top(cut.top, head, acts[:ntr], labels[:ntr], num_classes, w_tr, cfg, cfg.fine_tune_epochs,
                             cfg.seed + 1, (acts[ntr:], labels[ntr:]) if has_val else None, progress,
                             "fine-tune (training photos)", replicas)
        h = hist.history
        ran = len(h.get("loss", []))
        best = int(np.argmin(h["val_loss"])) + 1 if has_val else ran
        for i in range(ran):
            rows.append({"stage": "fine_tune", **{k: float(v[i]) for k, v in h.items()
                                                  if k in ("loss", "accuracy", "val_loss", "val_accuracy")}})
        val_probs = None
        if has_val:
            inp = keras.Input(acts.shape[2:])
            probe = keras.Model(inp, head(cut.top(inp)))
            val_probs = np.concatenate([predict(probe, acts[i : i + cfg.batch_size, 0].astype(np.float32))
                                        for i in range(ntr, len(labels), cfg.batch_size)])
        summary = {"recipe": "cached trunk views, warm-up + cosine, early stopping on validation loss",
                   "from_layer": cut.start, "cut_at": cut.at, "layers_trained": cut.trained,
                   "views": cfg.fine_tune_views, "learning_rate": cfg.fine_tune_lr,
                   "label_smoothing": LABEL_SMOOTHING, "epochs": cfg.fine_tune_epochs, "epochs_run": ran,
                   "best_epoch": best, "fit_on": "train", "num_fit": ntr, "kept": True}
        if val_probs is not None and head_val_accuracy is not None:
            acc = float((val_probs.argmax(1) == labels[ntr:]).mean())
            summary.update(validation_accuracy=acc, head_validation_accuracy=float(head_val_accuracy))
            if cfg.fine_tune_keep == "better" and not acc > head_val_accuracy:
                log.warning("fine-tuning did not beat the head alone on the %d validation photos (%.4f against "
                            "%.4f): the run keeps the head alone", len(val_samples), acc, head_val_accuracy)
                cut.top.set_weights(start)
                set_head_layers(head, head_all if head_all is not None else head_train)
                summary.update(kept=False, fit_on="none", num_fit=0)
                val_probs = None
        if summary["kept"] and head_all is not None and has_val:
            cut.top.set_weights(start)
            set_head_layers(head, head_all)
            w_all = balanced_class_weights(labels, num_classes) if balanced else None
            _, hist_all = _train_top(cut.top, head, acts, labels, num_classes, w_all, cfg, best, cfg.seed + 2,
                                     None, progress, "fine-tune (all photos)", replicas)
            for i, loss in enumerate(hist_all.history.get("loss", [])):
                rows.append({"stage": "fine_tune_all", "loss": float(loss),
                             "accuracy": float(hist_all.history["accuracy"][i])})
            summary.update({"fit_on": "train+val", "num_fit": len(labels), "epochs_all": best})
    finally:
        trunk.close()
    for layer in model.layers:
        layer.trainable = False
    model.trainable = False
    return summary, rows, val_probs
