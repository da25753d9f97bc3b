"""``edgetl demo``: the whole slice on one photo folder.

1. hold one class out (the device will learn it later), train on the others (head only);
2. export an int8 bundle (backbone, classifier, trainable head) and verify it;
3. on the "device" (TensorFlow-free code path): predict photos of the held-out class, add a
   few of them as a new class, retrain the head, predict the rest again.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .data import scan_folder
from .errors import ConfigError, DataError

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
Say = Callable[[str], None]


def fetch_flowers() -> Path:
    """TensorFlow's flower_photos, downloaded once into the Keras cache."""
    import keras

    try:
        path = keras.utils.get_file("flower_photos", origin=FLOWERS_URL, untar=True)
    except Exception as exc:
        raise DataError(
            f"could not download the demo photos ({str(exc)[:160]}); pass --data DIR with one sub-folder per class"
        ) from None
    p = Path(path)
    return p / "flower_photos" if (p / "flower_photos").is_dir() else p


def _link_subset(src: Path, dst: Path, classes: list[str], files: dict[str, list[Path]]) -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in files[c]:
            target = dst / c / f.name
            try:
                os.symlink(f.resolve(), target)
            except OSError:
                shutil.copy(f, target)
    return dst


def run_demo(out: Path, data: Path | None = None, holdout: str | None = None, per_class: int = 60,
             new_shots: int = 10, alpha: float = 1.0, size: int = 224, weights: str = "imagenet",
             say: Say = lambda s: None) -> dict:
    from .device import Learner
    from .export import export_run
    from .train import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another --out for the demo")
    src = Path(data) if data else fetch_flowers()
    folder = scan_folder(src, min_classes=3)
    holdout = holdout or folder.classes[-1]
    if holdout not in folder.classes:
        raise ConfigError(f"--holdout {holdout!r} is not a class of {src}; classes: {folder.classes}")
    files: dict[str, list[Path]] = {c: [] for c in folder.classes}
    for s in folder.samples:
        files[folder.classes[s.label]].append(s.path)
    known = [c for c in folder.classes if c != holdout]
    if len(files[holdout]) < new_shots + 2:
        raise DataError(f"class {holdout!r} has {len(files[holdout])} photos; the demo needs at least {new_shots + 2}")
    train_dir = _link_subset(src, out / "data" / "train", known, {c: files[c][:per_class] for c in known})
    say(f"1/4 data: {src} ({len(folder.samples)} photos, classes {', '.join(folder.classes)}); "
        f"training on {', '.join(known)} ({per_class} photos each at most); '{holdout}' is kept for the device")

    summary = train(TrainConfig(data_dir=str(train_dir), out_dir=str(out / "run"), alpha=alpha, size=size,
                                weights=weights, epochs=30))
    say(f"2/4 trained the head on {summary['num_train']} photos in {summary['timings_s']['total']:.1f} s: "
        f"validation accuracy {summary['val_accuracy']:.3f} ({out / 'run'})")

    report = export_run(out / "run", out / "bundle", targets=["tflite:int8", "tflite-trainable"],
                        roles=("classifier", "backbone"), calibration_images=100, max_drop=100.0)
    int8 = {v["file"]: v for v in report["files"]}
    say(f"3/4 exported {out / 'bundle'}: int8 classifier accuracy {int8['classifier_int8.tflite']['accuracy']:.3f} "
        f"vs Keras {report['keras_accuracy']:.3f}; backbone feature cosine "
        f"{int8['backbone_int8.tflite']['cosine_mean']:.4f}")

    learner = Learner.open(out / "bundle", store=out / "device" / "store.sqlite", threads=1)
    shots, rest = files[holdout][:new_shots], files[holdout][new_shots:new_shots + 40]
    before = learner.predict(rest)["predictions"]
    learner.add(shots, holdout)
    t = learner.train()
    after = learner.predict(rest)["predictions"]
    acc_after = sum(p.get("label") == holdout for p in after) / len(after)
    guessed = sorted({p.get("label") for p in before})
    say(f"4/4 device: before, {len(rest)} '{holdout}' photos were called {', '.join(guessed)}; "
        f"added {len(shots)} photos of '{holdout}', retrained in {t['seconds'] * 1000:.0f} ms "
        f"(head version {t['version']}); now {acc_after:.0%} of them are '{holdout}'")
    learner.close()
    return {"out": str(out), "holdout": holdout, "val_accuracy": summary["val_accuracy"],
            "keras_accuracy": report["keras_accuracy"], "int8_accuracy": int8["classifier_int8.tflite"]["accuracy"],
            "new_class_accuracy_after": acc_after, "retrain_seconds": t["seconds"],
            "seconds": round(time.perf_counter() - t0, 1)}
