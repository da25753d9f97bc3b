"""Read a run folder written by :func:`edgetl.train.trainer.train`."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from ..data import Sample, scan_folder
from ..errors import ConfigError, DataError, ModelError
from ..head.arrays import Layers, load_head
from ..preprocess import Preprocessing
from .head import build_classifier, set_head_layers

# model.keras is not among them: a run trained without TensorFlow (edgetl.train.quick) gets it
# built from its backbone and head.npz when first needed.
RUN_FILES = ("run.json", "head.npz", "labels.txt")


def check_run_target(target: Path, force: bool) -> None:
    """Refuse to write over anything but an empty folder, or (with ``force``) an earlier run."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"--out {str(target)!r} exists and is not a folder; choose another --out")
    if not [p for p in target.iterdir() if p.name != "cache"]:
        return  # empty, or only a feature cache (reused)
    if not (target / "run.json").is_file():
        raise ConfigError(f"--out {str(target)!r} exists and is not an edgetl run folder (no run.json); "
                          "choose another --out")
    if not force:
        raise ConfigError(f"--out {str(target)!r} already holds a run; pass --force to replace it "
                          "(its feature cache is reused) or choose another --out")


class Run:
    def __init__(self, path: str | Path):
        self.dir = Path(path)
        missing = [f for f in RUN_FILES if not (self.dir / f).exists()]
        if missing:
            raise ModelError(f"{str(self.dir)!r} is not a complete run folder: missing {', '.join(missing)}")
        try:
            self.info = json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {self.dir / 'run.json'}: {exc}") from None
        self.labels: list[str] = list(self.info["classes"])
        self.preprocessing = Preprocessing.from_dict(self.info["preprocessing"])
        self.backbone_identity: dict = self.info["backbone"]

    @cached_property
    def classifier(self):
        import keras

        path = self.dir / "model.keras"
        if not path.exists():
            return self._build_classifier(path)
        try:  # safe_mode (the default): no code from the file runs
            return keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises ValueError, TypeError, OSError, zipfile errors, ...
            text = " ".join(str(exc).split())
            if "Lambda" in text or "safe_mode" in text:
                raise ModelError(f"{str(path)!r} holds a Lambda layer (Python code stored in the file); edgetl does "
                                 "not run code from a model file. Train the run with 'edgetl train', or load it in "
                                 "Keras yourself if you trust it") from None
            raise ModelError(f"cannot load {str(path)!r} ({type(exc).__name__}: {text[:300]})") from None

    def _build_classifier(self, path: Path):
        """The Keras classifier of a run trained without TensorFlow: its backbone (checked to be the
        one the features came from) and head.npz; saved as model.keras when the folder allows."""
        import os

        from .backbones import build_backbone
        from .head import build_head

        ident = self.backbone_identity
        try:
            weights = json.loads((self.dir / "config.json").read_text()).get("weights", ident["weights"])
        except (OSError, ValueError):
            weights = ident["weights"]
        backbone = build_backbone(ident["name"], ident["alpha"], int(ident["input_size"]), weights)
        if backbone.weights_sha256 != ident["weights_sha256"]:
            raise ModelError(f"{str(self.dir)!r} has no model.keras, and the backbone built from {weights!r} is not "
                             "the one its features came from (weights sha256 differ); retrain the run")
        layers = self.head()
        head = build_head(backbone.feature_dim, len(self.labels), [w.shape[1] for w, _ in layers[:-1]])
        set_head_layers(head, layers)
        classifier = build_classifier(backbone.model, head, backbone.size)
        tmp = self.dir / ".model.keras.tmp.keras"
        try:
            classifier.save(tmp)
            os.replace(tmp, path)
        except OSError:  # a read-only run folder: the model is built again next time
            tmp.unlink(missing_ok=True)
        return classifier

    @property
    def backbone_model(self):
        """The backbone inside the classifier (image -> pooled feature)."""
        import keras

        for layer in self.classifier.layers:
            if isinstance(layer, keras.Model) and layer.name != "head":
                return layer
        raise ModelError(f"{self.dir / 'model.keras'} holds no backbone sub-model")

    @property
    def head_model(self):
        return self.classifier.get_layer("head")

    def head(self) -> Layers:
        return load_head(self.dir / "head.npz")

    def classifier_with(self, layers: Layers):
        """The run's classifier with other head weights (same architecture)."""
        import keras

        head = keras.models.clone_model(self.head_model)
        set_head_layers(head, layers)
        return build_classifier(self.backbone_model, head, int(self.preprocessing.size))

    def samples(self, which: str) -> list[Sample]:
        """The exact training or validation files of this run (which: 'train' or 'val')."""
        data = self.info["data"]
        root = data["val_dir"] if which == "val" and data.get("val_dir") else data["train_dir"]
        wanted = set(self.info[f"{which}_files"])
        try:
            folder = scan_folder(root, classes=self.labels)
        except DataError as exc:
            raise DataError(f"the run's {which} photos are no longer readable: {exc}") from None
        found = [s for s in folder.samples if s.relpath in wanted]
        if not found:
            raise DataError(f"none of the run's {len(wanted)} {which} files are in {root!r} any more")
        return found
