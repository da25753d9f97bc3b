"""Training configuration: a frozen dataclass of plain values (no framework objects)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

CLASS_WEIGHTS = ("balanced", "none")
DISTRIBUTE = ("none", "mirrored", "multiworker")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; written to ``config.json`` in the run folder.

    Attributes:
        data_dir: folder with one sub-folder of images per class.
        out_dir: the run folder to write (created; an earlier run's feature cache is reused).
        val_dir: explicit validation folder; when None, ``val_split`` of each class is held out.
        val_split: fraction held out per class, chosen by hash of the relative path.
        backbone, alpha, size, weights: the frozen feature extractor.
        epochs: head epochs (early stopping on validation loss keeps the best weights).
        hidden, dropout: optional hidden Dense layers of the head and their dropout.
        label_smoothing: applied to one-hot targets.
        class_weights: "balanced" (weights inverse to class frequency) or "none".
        augment: train on augmented images through the frozen backbone instead of cached
            features (slower: the backbone runs on every image in every epoch).
        fine_tune_layers / fine_tune_from: unfreeze the top N layers, or all layers from a
            named one; BatchNorm layers always stay frozen, in inference mode.
        distribute: "none", "mirrored" (all local GPUs) or "multiworker" (TF_CONFIG).
        mixed_precision: float16 compute on GPU (ignored, with a warning, without one).
        strict: an unreadable image is an error instead of a skipped file.
        cache_dir: where features are cached; default ``<out_dir>/cache``.
    """

    data_dir: str
    out_dir: str
    val_dir: str | None = None
    val_split: float = 0.2
    split_seed: str = "edgetl"
    backbone: str = "mobilenet_v2"
    alpha: float | None = 1.0
    size: int = 224
    weights: str = "imagenet"
    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = ()
    dropout: float = 0.5
    label_smoothing: float = 0.0
    class_weights: str = "balanced"
    patience: int = 10
    augment: bool = False
    fine_tune_layers: int = 0
    fine_tune_from: str | None = None
    fine_tune_epochs: int = 5
    fine_tune_lr: float = 1e-5
    distribute: str = "none"
    mixed_precision: bool = False
    strict: bool = False
    seed: int = 0
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "hidden" in kw:
            kw["hidden"] = tuple(kw["hidden"])
        return cls(**kw)

    def check(self) -> None:
        """Refuse values training cannot use, before anything heavy is imported."""
        from .backbones import resolve_backbone

        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1; received {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1; received {self.batch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); received {self.dropout}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"class_weights must be one of {CLASS_WEIGHTS}; received {self.class_weights!r}")
        if self.distribute not in DISTRIBUTE:
            raise ConfigError(f"distribute must be one of {DISTRIBUTE}; received {self.distribute!r}")
        if self.fine_tune_layers < 0:
            raise ConfigError(f"fine_tune_layers must be >= 0; received {self.fine_tune_layers}")
        if self.fine_tune_layers and self.fine_tune_from:
            raise ConfigError("give either fine_tune_layers or fine_tune_from, not both")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer sizes must be positive; received {list(self.hidden)}")
        resolve_backbone(self.backbone, self.alpha, self.size)

    @property
    def fine_tunes(self) -> bool:
        return bool(self.fine_tune_layers) or bool(self.fine_tune_from)
