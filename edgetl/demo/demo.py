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

from ..data import scan_folder
from ..errors import ConfigError, DataError
from ..fileio import atomic_write_json

MARKER = ".edgetl-demo"
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
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out} exists, is not empty and was not written by 'edgetl demo'; "
                              "choose another --out for the demo")
        shutil.rmtree(out)  # the demo's own earlier output: run it again from scratch
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by 'edgetl demo'; the next demo with this --out replaces this folder\n")
    try:
        return _run(out, t0, data, holdout, per_class, new_shots, alpha, size, weights, say)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # a failed demo leaves nothing behind
        raise


def _accuracy(predictions: list[dict], truth: list[str]) -> float:
    return sum(p.get("label") == t for p, t in zip(predictions, truth)) / max(1, len(truth))


def _run(out: Path, t0: float, data, holdout, per_class, new_shots, alpha, size, weights, say: Say) -> dict:
    from ..device import Learner
    from ..export import export_run
    from ..train import TrainConfig, train

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

    # Photos neither the workstation nor the device trained on: the rest of the held-out class,
    # and photos of the known classes beyond the ones the workstation used.
    shots, new_test = files[holdout][:new_shots], files[holdout][new_shots:new_shots + 40]
    old_test = [f for c in known for f in files[c][per_class:per_class + 20]]
    old_truth = [c for c in known for _ in files[c][per_class:per_class + 20]]
    learner = Learner.open(out / "bundle", store=out / "device" / "store.sqlite", threads=1)
    try:
        new_before = learner.predict(new_test)["predictions"]
        old_before = _accuracy(learner.predict(old_test)["predictions"], old_truth) if old_test else None
        learner.add(shots, holdout)
        t = learner.train()
        new_after = _accuracy(learner.predict(new_test)["predictions"], [holdout] * len(new_test))
        old_after = _accuracy(learner.predict(old_test)["predictions"], old_truth) if old_test else None
    finally:
        learner.close()
    guessed = sorted({p.get("label") for p in new_before})
    say(f"4/4 device: added {len(shots)} photos of '{holdout}' (before, the other {len(new_test)} were called "
        f"{', '.join(guessed)}) and retrained the head in {t['seconds'] * 1000:.0f} ms (head version {t['version']}).")
    say("    accuracy on photos no one trained on (int8 backbone, TensorFlow-free device code):")
    say(f"    {'':<34}{'before':>8}{'after':>8}")
    say(f"    {f'new class {holdout!r} ({len(new_test)} photos)':<34}{0.0:>8.3f}{new_after:>8.3f}")
    if old_before is not None:
        say(f"    {f'the {len(known)} old classes ({len(old_test)} photos)':<34}{old_before:>8.3f}{old_after:>8.3f}")
    result = {"out": str(out), "holdout": holdout, "val_accuracy": summary["val_accuracy"],
              "keras_accuracy": report["keras_accuracy"], "int8_accuracy": int8["classifier_int8.tflite"]["accuracy"],
              "new_class_accuracy_after": new_after, "old_classes_accuracy_before": old_before,
              "old_classes_accuracy_after": old_after, "num_new_test": len(new_test), "num_old_test": len(old_test),
              "retrain_seconds": t["seconds"], "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "demo.json", result)
    return result
