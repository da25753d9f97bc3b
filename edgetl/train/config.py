"""Training configuration: a frozen dataclass of plain values (no framework objects)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import ConfigError
from . import backend
from .backbones import BACKBONES, resolve_backbone

CLASS_WEIGHTS = ("balanced", "none")
SOLVERS = ("auto", "lbfgs", "adam")
FINAL_FITS = ("all", "train")
DISTRIBUTE = ("none", "mirrored", "multiworker")
FINE_TUNE_KEEP = ("better", "always")
FEATURE_ENGINES = ("auto", "litert", "keras")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; written to ``config.json`` in the run folder.

    Attributes:
        data_dir: folder with one sub-folder of images per class.
        out_dir: the run folder to write (created; an earlier run's feature cache is reused).
        val_dir: explicit validation folder; when None, ``val_split`` of each class is held out.
        val_split: fraction held out per class, chosen by hash of the relative path.
        backbone, alpha, size, weights: the frozen feature extractor.
        solver: how the head is fitted. "lbfgs": the converged solver both sides share
            (:mod:`edgetl.head.solver`): L2 by 5-fold cross-validation on the training photos'
            features (one-standard-error rule) unless ``l2`` is given, then solved to
            convergence; "adam": Keras, ``epochs`` with early stopping on validation loss;
            "auto": lbfgs for a linear head on cached features without label smoothing, else adam.
        l2: the lbfgs solver's L2 (None: chosen by cross-validation).
        final_fit: lbfgs only: "all" refits the chosen head on the training AND validation
            photos once the validation figures are measured (not when fine-tuning follows,
            which early-stops on them); "train": the head fitted on the training split is kept.
        epochs: head epochs of the adam solver (early stopping on validation loss keeps the best weights).
        hidden, dropout: optional hidden Dense layers of the head and their dropout.
        label_smoothing: applied to one-hot targets.
        class_weights: "balanced" (weights inverse to class frequency) or "none".
        augment: train on augmented images through the frozen backbone instead of cached
            features (slower: the backbone runs on every image in every epoch).
        fine_tune: fine-tune the top of the backbone with the measured recipe
            (:mod:`edgetl.train.finetune`: from block_10_expand for MobileNetV2).
        fine_tune_layers / fine_tune_from: instead of the recipe's layer, train the top N layers, or
            all layers from a named one; BatchNorm layers always stay frozen, in inference mode.
        fine_tune_epochs, fine_tune_lr, fine_tune_views: the most epochs (early stopping on the
            validation loss), the peak learning rate (Adam, warm-up then cosine) and the views of
            each photo (itself, mirrored, random crops) the trunk's activations are kept for.
        fine_tune_keep: "better": the fine-tuned model is kept only if it classifies more of the
            validation photos correctly than the head alone (else the run is the head alone, and
            says so); "always": kept regardless (as without validation photos).
        distribute: "none", "mirrored" (all local devices: TensorFlow's MirroredStrategy, JAX's
            DataParallel) or "multiworker" (several machines, under JAX only: jax.distributed).
        mixed_precision: bfloat16 compute on GPU (ignored, with a warning, without one).
        strict: an unreadable image is an error instead of a skipped file.
        cache_dir: where features are cached; default ``<out_dir>/cache``.
        feature_engine: what runs the frozen backbone for features: "litert" (the backbone
            converted to TFLite once, checked against Keras on every run's first photos),
            "keras", or "auto": litert without a GPU, keras with one.
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
    solver: str = "auto"
    l2: float | None = None
    final_fit: str = "all"
    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = ()
    dropout: float = 0.5
    label_smoothing: float = 0.0
    class_weights: str = "balanced"
    patience: int = 10
    augment: bool = False
    fine_tune: bool = False
    fine_tune_layers: int = 0
    fine_tune_from: str | None = None
    fine_tune_epochs: int = 15
    fine_tune_lr: float = 3e-4
    fine_tune_views: int = 4
    fine_tune_keep: str = "better"
    distribute: str = "none"
    mixed_precision: bool = False
    strict: bool = False
    seed: int = 0
    cache_dir: str | None = None
    feature_engine: str = "auto"

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

    @classmethod
    def from_options(cls, **options) -> TrainConfig:
        """The config from ``edgetl train``'s parsed options: paths become strings, a missing
        ``out_dir`` is ``runs/<data folder name>``, a missing ``alpha`` the backbone's default."""
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
        if not values.get("out_dir"):
            values["out_dir"] = str(Path("runs") / Path(values["data_dir"]).resolve().name)
        if values.get("alpha") is None and values.get("backbone", cls.backbone) in BACKBONES:
            values["alpha"] = BACKBONES[values.get("backbone", cls.backbone)].default_alpha
        return cls(**values)

    def check(self) -> None:
        """Refuse values training cannot use, before anything heavy is imported."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1; received {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1; received {self.batch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); received {self.dropout}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}; received {self.solver!r}")
        if self.final_fit not in FINAL_FITS:
            raise ConfigError(f"final_fit must be one of {FINAL_FITS}; received {self.final_fit!r}")
        if self.l2 is not None and self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0; received {self.l2}")
        if self.solver == "lbfgs" and not self._linear_on_features:
            raise ConfigError("solver 'lbfgs' fits a linear head on cached features: it cannot take hidden layers, "
                              "augmentation or label smoothing; use solver 'adam' (or 'auto') for those")
        if self.feature_engine not in FEATURE_ENGINES:
            raise ConfigError(f"feature_engine must be one of {FEATURE_ENGINES}; received {self.feature_engine!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"class_weights must be one of {CLASS_WEIGHTS}; received {self.class_weights!r}")
        if self.distribute not in DISTRIBUTE:
            raise ConfigError(f"distribute must be one of {DISTRIBUTE}; received {self.distribute!r}")
        if self.distribute == "multiworker" and backend.wanted() == "tensorflow":
            raise ConfigError(backend.MULTIWORKER_TF)
        if self.fine_tune_layers < 0:
            raise ConfigError(f"fine_tune_layers must be >= 0; received {self.fine_tune_layers}")
        if self.fine_tune_keep not in FINE_TUNE_KEEP:
            raise ConfigError(f"fine_tune_keep must be one of {FINE_TUNE_KEEP}; received {self.fine_tune_keep!r}")
        if self.fine_tune_views < 1:
            raise ConfigError(f"fine_tune_views must be at least 1; received {self.fine_tune_views}")
        if self.fine_tunes and (self.hidden or self.augment):
            raise ConfigError("fine-tuning starts from the converged linear head: it cannot take hidden layers or "
                              "--augment (its own views of each photo are the augmentation); received "
                              f"hidden {list(self.hidden)}, augment {self.augment}")
        if self.fine_tune_layers and self.fine_tune_from:
            raise ConfigError("give either fine_tune_layers or fine_tune_from, not both")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer sizes must be positive; received {list(self.hidden)}")
        resolve_backbone(self.backbone, self.alpha, self.size)

    @property
    def _linear_on_features(self) -> bool:
        return not self.hidden and not self.augment and self.label_smoothing == 0

    @property
    def head_solver(self) -> str:
        """The solver that fits the head: ``solver`` with "auto" resolved."""
        if self.solver == "auto":
            return "lbfgs" if self._linear_on_features else "adam"
        return self.solver

    @property
    def fine_tunes(self) -> bool:
        return self.fine_tune or bool(self.fine_tune_layers) or bool(self.fine_tune_from)
