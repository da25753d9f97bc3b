"""The device learner: a verified bundle + a sample store + a head retrainer, as one front.

    learner = Learner.open("models/flowers", store="state/flowers.sqlite")
    learner.add(["a.jpg", "b.jpg"], "my_mug")      # features stored durably
    learner.train()                                 # new head version, old one kept
    learner.predict(["c.jpg"], top_k=3)
    learner.rollback(1)

The work is done by its parts: :mod:`.backbone` (which backbone file, checked on this CPU),
:mod:`.features` (photos to features), :mod:`.store` (samples and head versions),
:mod:`.retrain` (the head retrained with the bundle's replay). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..bundle import Bundle, open_bundle
from ..bundle.selftest import cpu_fingerprint
from ..data import scan_folder
from ..errors import ConfigError, DataError, StoreError
from ..head.arrays import head_predict
from ..head.calibration import with_temperature
from ..head.fit import HeadTrainConfig, drop_classes
from ..head.ncm import head_with_new_means, ncm_predict
from ..labels import check_label, printable, storable
from ..metrics import classification_report
from ..metrics import top_k as top_k_labels
from ..preprocess import MIN_TRAINING_SIDE
from .backbone import BackboneCheck, first_passing_backbone, pick_backbone
from .bundle_out import export_personalized
from .features import Extracted, FeatureExtractor, PhotoLike
from .retrain import Retrainer, TrainingSet, bundle_names, carry_names, heldout_report
from .store import SampleStore

# auto: while some stored class is not in the head yet, the head for its classes and nearest class
# mean for the new ones ("head+ncm"); nearest class mean when it beat the head on the last
# training's held-back photos; the head otherwise.
MODES = ("auto", "head", "ncm")
HEAD_AND_NEW = "head+ncm"
TRAINERS = ("numpy", "tflite")


def default_store_path(bundle: Bundle) -> Path:
    """``$EDGETL_HOME/<bundle name>.sqlite`` (default ``~/.local/share/edgetl``)."""
    home = os.environ.get("EDGETL_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "edgetl")
    return Path(home) / f"{bundle.manifest.get('name', 'bundle')}.sqlite"


class Learner:
    def __init__(self, bundle: Bundle, store: SampleStore, backbone_entry: dict, runner, trainer: str = "numpy",
                 references: dict | None = None):
        if trainer not in TRAINERS:
            raise ConfigError(f"trainer must be 'numpy' or 'tflite'; received {trainer!r}")
        self.bundle = bundle
        self.store = store
        self.backbone_entry = backbone_entry
        self.runner = runner
        self.spec = bundle.preprocessing
        self.trainer = trainer
        self.extractor = FeatureExtractor(runner, self.spec, bundle.feature_dim)
        self.retrainer = Retrainer(bundle, backbone_entry, store, trainer, {} if references is None else references)
        self.backbone_check = BackboneCheck(bundle, backbone_entry, runner, store)
        if store.active_version() is None and not store.readonly:
            info = {"origin": "bundle", "note": "the workstation head from the bundle"}
            t = bundle.temperature(backbone_entry)
            if t is not None:  # a personalized bundle's calibration travels with its head
                info["temperature"] = {"value": t, "from": "bundle"}
            store.save_head(list(bundle.labels), bundle.head(backbone_entry), info)

    @classmethod
    def open(cls, bundle: str | Path, store: str | Path | None = None, backend: str | None = None,
             precision: str | None = None, threads: int | None = None, trainer: str = "numpy",
             check: bool = True, readonly: bool = False) -> Learner:
        """Open the bundle and its sample store. ``readonly``: for commands that only read
        (predict, history, info, eval, export); they never wait behind a writer. A store that
        does not exist yet (or has no head) is created by a normal open first."""
        b = open_bundle(bundle)
        store_path = Path(store) if store else default_store_path(b)
        made_with = SampleStore.backbone_of(store_path)
        entry = pick_backbone(b, store_path, backend, precision, made_with)
        runner = b.open_model(entry, threads=threads, backend=backend)
        checked = None
        if check and made_with is None and backend is None and precision is None and b.manifest.get("self_test"):
            # A new store may still choose its backbone file: the first, in the bundle's order of
            # preference, that computes on this CPU what the export verified.
            entry, runner, checked = first_passing_backbone(b, entry, runner, threads)
        readonly = readonly and made_with is not None and checked is None
        s = SampleStore(store_path, b.feature_dim, identity=entry["sha256"], readonly=readonly)
        if readonly and s.active_version() is None:  # an empty store: initialise it once
            s.close()
            s = SampleStore(store_path, b.feature_dim, identity=entry["sha256"])
        try:
            learner = cls(b, s, entry, runner, trainer)
            if checked is not None:
                learner.backbone_check.remember(checked)
            if check:
                learner.first_load_check()
        except BaseException:
            s.close()
            raise
        return learner

    def close(self) -> None:
        self.extractor.close()
        self.store.close()

    def worker(self) -> Learner:
        """The same learner on its own store connection, for another thread (e.g. a training
        job: training reads and writes the store but never runs the backbone). Close it there."""
        s = SampleStore(self.store.path, self.bundle.feature_dim, identity=self.backbone_entry["sha256"])
        return Learner(self.bundle, s, self.backbone_entry, self.runner, self.trainer,
                       references=self.retrainer.references)

    # -- photos in ---------------------------------------------------------------------------------
    def features(self, images: list[PhotoLike], ahead: int = 2) -> tuple[np.ndarray, list[str], list[str], list[dict]]:
        """Backbone features of the readable images, their digests and names; {file, error} for the others."""
        ex = self.extractor.extract(list(images), ahead)
        kept = ex.kept()
        errors = [{"file": printable(ex.names[i]), "error": ex.errors[i]} for i in range(len(ex.rows))
                  if ex.rows[i] is None]
        return ex.features, [ex.digests[i] for i in kept], [ex.names[i] for i in kept], errors

    def add_photos(self, photos: list[PhotoLike], label: str, dtype: str = "float32", skip_duplicates: bool = True,
                   new_class: bool = False, thumbnails: bool = False) -> list[dict]:
        """Extract and store samples of ``label``: one result per photo, in order: ``{file, id}``
        (stored), ``{file, duplicate: True}`` (already stored) or ``{file, error}``. The readable
        photos are stored in one transaction."""
        label = self._check_new_label(label, new_class)
        photos = list(photos)
        ex: Extracted = self.extractor.extract(photos, thumbs=thumbnails, min_side=MIN_TRAINING_SIDE)
        kept = ex.kept()
        names = [storable(ex.names[i]) for i in kept]  # a file name that is not UTF-8 is stored with \xNN escapes
        ids = self.store.add(ex.features, label, names, [ex.digests[i] for i in kept], dtype,
                             skip_duplicates=skip_duplicates, thumbs=[ex.thumbs[i] for i in kept] if thumbnails else None)
        out: list[dict] = [{"file": printable(ex.names[i]), "error": ex.errors[i]} for i in range(len(photos))]
        for i, name, sid in zip(kept, names, ids):
            out[i] = {"file": name, "id": sid} if sid is not None else {"file": name, "duplicate": True}
        return out

    def add(self, images: list[PhotoLike], label: str, dtype: str = "float32", skip_duplicates: bool = True,
            new_class: bool = False, thumbnails: bool = False) -> dict:
        """Extract and store samples of ``label`` (a new label becomes a new class at the next train).

        Unreadable images are reported by name; the others are stored in one transaction.
        ``images``: paths, or :class:`~edgetl.device.features.Photo` (bytes held in memory, e.g.
        an upload, with its name); ``thumbnails``: keep a small JPEG of what the model saw.
        """
        results = self.add_photos(images, label, dtype, skip_duplicates, new_class, thumbnails)
        stored = [r for r in results if "id" in r]
        return {"label": check_label(label, "--label").strip(), "stored": len(stored),
                "ids": [r["id"] for r in stored], "files": [r["file"] for r in stored],
                "duplicates": [r["file"] for r in results if r.get("duplicate")],
                "errors": [r for r in results if "error" in r]}

    def _check_new_label(self, label: str, new_class: bool) -> str:
        label = check_label(label, "--label").strip()
        known = list(dict.fromkeys(self.labels() + list(self.store.counts())))
        similar = [k for k in known if k != label and k.casefold() == label.casefold()]
        if similar and not new_class:
            raise ConfigError(f"label {label!r} differs from the existing class {similar[0]!r} only in case; "
                              f"use {similar[0]!r}, or pass --new-class to make {label!r} a class of its own")
        return label

    def labels(self) -> list[str]:
        return list(self.store.head().labels)

    def training_set(self, labels: list[str] | None = None) -> TrainingSet:
        """The replay and stored features of ``labels`` (default: the active head's)."""
        return self.retrainer.training_set(self.labels() if labels is None else labels)

    # -- training ----------------------------------------------------------------------------------
    def train(self, config: HeadTrainConfig | None = None, progress: Callable[[float], None] | None = None,
              holdout_every: int | None = None, force: bool = False) -> dict:
        """Retrain the head on replay + stored samples; store it as a new active version.

        ``progress(fraction)`` is called as training goes (it may raise to abandon the training:
        nothing is saved). ``holdout_every=k``: first fit a head without every k-th stored sample
        of each class (classes with at least k samples) and measure it on those; the figures
        (accuracy, confusion matrix, misclassified sample ids) go into the new version's info
        as ``heldout``. The version itself is then trained on everything.

        With classes learned on the device and the bundle's replay features, every 5th replay
        feature of each bundle class is held back and two heads are fitted without them: one of
        the bundle's classes alone (its accuracy there is kept in the store: it depends on the
        bundle and the settings only), one with the device's. The device's classes get the largest
        bias that keeps the bundle's classes within ``config.old_class_budget`` of the first
        head's accuracy on those photos, and the second head, so calibrated, is the new version
        (with ``holdout_every``, a head fitted on everything). A training whose new classes cost
        more than that even without a bias (forgetting) is saved but not activated, unless ``force``.
        """
        return self.retrainer.train(config, progress, holdout_every, force)

    # -- the bundle's self-test on this CPU ------------------------------------------------------
    def first_load_check(self) -> dict | None:
        """Once per bundle, backbone file and CPU kind: the backbone file against the bundle's
        references. Cached in the store; a file below the export's thresholds is refused."""
        return self.backbone_check.first_load()

    def check_file(self, entry: dict) -> dict:
        """Run one backbone or classifier file of the bundle on the references, on this CPU."""
        return self.backbone_check.file(entry)

    def check(self) -> dict:
        """Every backbone and classifier file of the bundle on this CPU (``edgetl device check``)."""
        return self.backbone_check.every_file()

    def export(self, out: str | Path, force: bool = False) -> dict:
        """The active head, labels and replay (bundle's + stored samples) as a new bundle."""

        return export_personalized(self, out, force=force)

    def info(self) -> dict:
        head = self.store.head()
        replay = self.bundle.replay(self.backbone_entry)
        return {
            "bundle": str(self.bundle.source),
            "bundle_sha256": self.bundle.digest,  # of manifest.json: compare it with the publisher's
            "backbone_file": self.backbone_entry["file"],
            "backbone": self.bundle.backbone_identity,
            "backend": self.runner.backend,
            "precision": self.backbone_entry.get("precision"),
            "input_size": self.spec.size,
            "feature_dim": self.bundle.feature_dim,
            "store": str(self.store.path),
            "head_version": head.version,
            "labels": head.labels,
            "samples": self.store.counts(),
            "replay_features": 0 if replay is None else int(len(replay[1])),
            "trainer": self.trainer,
            "cpu": cpu_fingerprint(),
            "last_check": self.backbone_check.last(),
        }

    # -- answers and versions ----------------------------------------------------------------------
    def remove_sample(self, sample_id: int) -> dict:
        """Delete one stored sample (the head keeps what it learned until the next train)."""
        label = self.store.remove_sample(sample_id)
        if label is None:
            raise DataError(f"no stored sample with id {sample_id}")
        return {"id": int(sample_id), "label": label, "samples": self.store.counts()}

    def rename(self, label: str, new_name: str) -> dict:
        """Give a class another name: its samples and (in a new head version) its output."""
        new_name = check_label(new_name, "new name").strip()
        head = self.store.head()
        counts = self.store.counts()
        if label not in head.labels and label not in counts:
            raise DataError(f"unknown label {label!r}; known: {sorted(set(head.labels) | set(counts))}")
        if new_name == label:
            return {"label": label, "name": new_name, "samples": counts.get(label, 0), "version": head.version}
        taken = [k for k in set(head.labels) | set(counts) if k.casefold() == new_name.casefold() and k != label]
        if taken:
            raise ConfigError(f"a class {taken[0]!r} already exists; pick another name")
        new_head = None
        if label in head.labels:
            names = [new_name if n == label else n for n in head.labels]
            new_head = (names, head.layers, carry_names(self.bundle, head, {"origin": "rename", "renamed": [label, new_name],
                                                                     "parent": head.version}, (label, new_name)))
        moved, version = self.store.rename_label(label, new_name, new_head)
        return {"label": label, "name": new_name, "samples": moved, "version": version or head.version}

    def predict(self, images: list[PhotoLike], top_k: int = 3, mode: str = "auto",
                unknown_below: float | None = None, version: int | None = None) -> dict:
        """Same document as ``edgetl predict --json``, one prediction per image in order.
        ``mode``: head (the active head; its scores temperature-calibrated on the last training's
        held-back photos), ncm (nearest class mean of stored samples and replay, centred features:
        no training needed) or auto (see :meth:`answer_mode`). A photo whose best score is below
        ``unknown_below`` is answered ``label: null, unknown: true`` (its top labels are still listed).
        ``version``: answer with that head version instead of the active one (nothing changes)."""
        if unknown_below is not None and not 0.0 <= unknown_below <= 1.0:
            raise ConfigError(f"unknown_below must be in [0, 1]; received {unknown_below}")
        used, reason = self.answer_mode(mode, version)
        ex = self.extractor.extract(list(images))
        labels, probs = self.scores(ex.features, used, version)
        tops = top_k_labels(probs, labels, top_k) if len(ex.features) else []
        preds = []
        for name, row, error in zip(ex.names, ex.rows, ex.errors):
            if row is None:
                preds.append({"file": printable(name), "error": error or "not processed"})
                continue
            t = tops[row]
            unknown = unknown_below is not None and t[0]["score"] < unknown_below
            preds.append({"file": printable(name), "label": None if unknown else t[0]["label"],
                          "score": t[0]["score"], "top": t, **({"unknown": True} if unknown else {})})
        out = {"predictions": preds, "mode": used, "head_version": self._head(version).version}
        if mode == "auto":
            out["mode_reason"] = reason or "the trained head"
        return out

    def _head(self, version: int | None = None):
        """The active head version, or ``version``."""
        head = self.store.head(version)
        if head is None:
            raise DataError(f"no head version {version}; versions: {[h['version'] for h in self.store.history()]}")
        return head

    def scores(self, feats: np.ndarray, mode: str, version: int | None = None) -> tuple[list[str], np.ndarray]:
        """The labels and the scores of features under ``mode`` 'head' (temperature-calibrated),
        'ncm' (centred nearest class mean) or 'head+ncm' (the head for its classes, class means for
        stored classes not in it yet), for the active head version or ``version``."""
        if mode in ("head", HEAD_AND_NEW):
            head = self._head(version)
            t = (head.info.get("temperature") or {}).get("value")
            probs = with_temperature(head_predict(feats, head.layers), t) if len(feats) else np.zeros((0, len(head.labels)))
            if mode == "head":
                return head.labels, probs
            labels, means = self.class_means(version)
            return head_with_new_means(probs, head.labels, ncm_predict(feats, means, centre=self.retrainer.centre())
                                       if len(feats) else np.zeros((0, len(labels))), labels)
        labels, means = self.class_means(version)
        return labels, ncm_predict(feats, means, centre=self.retrainer.centre()) if len(feats) else np.zeros((0, 1))

    def _answer_labels(self, mode: str, version: int | None = None) -> list[str]:
        """The labels that ``scores`` answers with under ``mode`` (resolved, not 'auto')."""
        head_labels = list(self._head(version).labels)
        if mode == "head":
            return head_labels
        means_labels = self.class_means(version)[0]
        if mode == HEAD_AND_NEW:
            return head_labels + [n for n in means_labels if n not in head_labels]
        return means_labels

    def class_means(self, version: int | None = None) -> tuple[list[str], np.ndarray]:
        """Mean feature per class: stored samples and, for the bundle's classes, replay features."""
        head = self._head(version)
        labels = list(head.labels) + [n for n in self.store.counts() if n not in head.labels]
        names = bundle_names(self.bundle, head)
        ts = self.retrainer.training_set(labels, names)  # the replay's class sums are cached
        counts = np.bincount(ts.y, minlength=len(labels))
        present = np.flatnonzero(counts)
        if not len(present):
            raise DataError("no samples to compute class means from; 'add' some photos first")
        means = (self.retrainer.class_sums(labels, ts, names)[present] / counts[present, None]).astype(np.float32)
        return [labels[c] for c in present], means

    def remove(self, label: str) -> dict:
        """Delete the label's samples and stop predicting it (a new head version; rollback undoes it)."""
        head = self.store.head()
        counts = self.store.counts()
        if label not in head.labels and label not in counts:
            raise DataError(f"unknown label {label!r}; known: {sorted(set(head.labels) | set(counts))}")
        new_head = None
        if label in head.labels:
            keep = [i for i, n in enumerate(head.labels) if n != label]
            if not keep:
                raise DataError(f"cannot remove {label!r}: it is the only class")
            new_head = ([head.labels[i] for i in keep], drop_classes(head.layers, keep),
                        carry_names(self.bundle, head, {"origin": "remove", "removed": label, "parent": head.version}))
        # The samples and the head go in one transaction: a kill leaves both or neither.
        deleted, version = self.store.remove_label(label, new_head)
        return {"label": label, "samples_deleted": deleted, "version": version or head.version}

    def history(self) -> list[dict]:
        return self.store.history()

    def evaluate(self, data_dir: str | Path, mode: str = "auto", version: int | None = None) -> dict:
        """Accuracy of the active head (or NCM, or what ``auto`` picks) on a class folder, split
        into the bundle's original classes and the classes learned on the device. ``version``:
        measure that head version instead of the active one (nothing is activated)."""
        mode, _ = self.answer_mode(mode, version)
        labels = self._answer_labels(mode, version)
        folder = scan_folder(data_dir, classes=labels)
        if not folder.samples:
            raise DataError(f"{str(data_dir)!r} holds no images of the classes {labels}")
        r = self.predict([s.path for s in folder.samples], top_k=1, mode=mode, version=version)
        truth, pred, errors = [], [], []
        for s, p in zip(folder.samples, r["predictions"]):
            if "error" in p:
                errors.append({"file": p["file"], "reason": p["error"]})
                continue
            truth.append(s.label)
            pred.append(labels.index(p["label"]))
        report = classification_report(np.array(truth, np.int64), np.array(pred, np.int64), labels)
        original = set(bundle_names(self.bundle, self._head(version)))

        def acc(group: set[str]) -> tuple[float | None, int]:
            idx = [i for i, t in enumerate(truth) if labels[t] in group]
            if not idx:
                return None, 0
            return float(np.mean([truth[i] == pred[i] for i in idx])), len(idx)

        report["original_classes"] = dict(zip(("accuracy", "num_images"), acc(original)))
        report["new_classes"] = dict(zip(("accuracy", "num_images"), acc(set(labels) - original)))
        report.update({"mode": mode, "head_version": r["head_version"], "data_dir": str(data_dir),
                       "skipped": errors, "model": f"device head version {r['head_version']} ({mode})"})
        return report

    def rollback(self, version: int | None = None) -> dict:
        """Make an earlier head version active (default: the parent of the active one)."""
        if version is None:
            parent = self.store.head().info.get("parent")
            if parent is None:
                raise StoreError("the active head has no parent to roll back to; give a version (see 'history')")
            version = int(parent)
        self.store.set_active(version)
        head = self.store.head()
        return {"version": head.version, "labels": head.labels}

    def answer_mode(self, mode: str = "auto", version: int | None = None) -> tuple[str, str | None]:
        """Which of head and NCM answers ``mode``, and why (for ``auto``)."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(map(repr, MODES))}; received {mode!r}")
        if mode != "auto":
            return mode, None
        head = self._head(version)
        untrained = [n for n in self.store.counts() if n not in head.labels]
        if untrained:
            return HEAD_AND_NEW, (f"the head for its classes, nearest class mean for {', '.join(map(printable, untrained))}"
                                  " (not in the head yet; 'train' makes one)")
        check = head.info.get("ncm_check")
        if check and check["ncm"] > check["head"]:
            return "ncm", (f"nearest class mean: it scored {check['ncm']:.3f} against the head's {check['head']:.3f} "
                           f"on {check['photos']} held-back {check['held_back']}")
        return "head", None

    def metrics(self) -> dict:
        """The active head measured on stored samples it was not trained on.

        A trained version carries the figures measured when it was trained (``train`` with
        ``holdout_every``); the bundle's own head is measured now on every stored sample of
        its classes (it never saw them). Other versions have none: the result says why.
        """
        head = self.store.head()
        if "heldout" in head.info:
            return {"version": head.version, **head.info["heldout"]}
        if head.info.get("origin") == "bundle":
            x, labels, ids = self.store.samples(head.labels)
            if len(x) == 0:
                return {"version": head.version, "available": False,
                        "reason": "no stored samples of the bundle's classes to measure its head on"}
            y = np.array([head.labels.index(n) for n in labels], np.int64)
            return {"version": head.version, **heldout_report(head.layers, x, y, np.array(ids), head.labels)}
        return {"version": head.version, "available": False,
                "reason": f"version {head.version} was made by {head.info.get('origin')!r}, not by a training with "
                          "held-back samples; train to measure one"}

