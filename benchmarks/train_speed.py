"""The seeds' recipe vs ``edgetl train`` (defaults, head only), each in a fresh process.

Seeds' recipe: a Keras model with the frozen MobileNetV2 base and a Dense head, trained with
``model.fit`` for N epochs on ``image_dataset_from_directory`` (the backbone runs on every
image in every epoch). edgetl: its defaults on an empty feature cache (a new run folder):
features once (LiteRT without a GPU), the converged head with L2 by cross-validation. Both
use the same training folder with a 20 % validation split and are scored on the same test
folder. Times run from starting each process to the end of its training: Python start and
TensorFlow import included, the test-set evaluation afterwards not. edgetl runs twice: without and with the backbone's TFLite conversion cached.

    python benchmarks/train_speed.py            # flowers, alpha 1.0, 224, 10 epochs (~4 min)
    python benchmarks/train_speed.py --train ../shared/datasets/hymenoptera/train \
        --test ../shared/datasets/hymenoptera/val --name train_speed_hymenoptera   # (~1 min)

The later edgetl runs take the quick path (edgetl.train.quick): no TensorFlow import at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, cpu_line, offline_keras_cache, table, write_json  # noqa: E402


def seeds_recipe(train_dir: Path, test_dir: Path, epochs: int, alpha: float, size: int) -> dict:
    import keras

    t0 = time.perf_counter()
    kw = dict(image_size=(size, size), batch_size=32, label_mode="int")
    train, val = keras.utils.image_dataset_from_directory(str(train_dir), validation_split=0.2, subset="both",
                                                          seed=123, **kw)
    prep = keras.applications.mobilenet_v2.preprocess_input
    train = train.map(lambda x, y: (prep(x), y))
    val = val.map(lambda x, y: (prep(x), y))
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=False,
                                          weights="imagenet")
    base.trainable = False
    n = len(train.class_names) if hasattr(train, "class_names") else 5
    model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dropout(0.2), keras.layers.Dense(n, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, validation_data=val, epochs=epochs, verbose=0)
    wall = time.perf_counter() - t0
    trained_at = time.time()
    test = keras.utils.image_dataset_from_directory(str(test_dir), shuffle=False, **kw).map(lambda x, y: (prep(x), y))
    _, acc = model.evaluate(test, verbose=0)
    return {"recipe": "seeds: keras model.fit, frozen base", "wall_s": wall, "test_accuracy": float(acc),
            "trained_at": trained_at}


def edgetl_recipe(train_dir: Path, test_dir: Path, epochs: int, alpha: float, size: int) -> dict:
    from edgetl.train import TrainConfig, train

    out = Path(tempfile.mkdtemp(prefix="edgetl-speed-"))  # a new run folder: an empty feature cache
    t0 = time.perf_counter()
    summary = train(TrainConfig(data_dir=str(train_dir), out_dir=str(out), alpha=alpha, size=size))
    wall = time.perf_counter() - t0
    trained_at = time.time()
    tensorflow_imported = "tensorflow" in sys.modules
    from edgetl.predict import evaluate, open_predictor  # (after the clock: builds model.keras if it was not written)

    acc = evaluate(open_predictor(out), test_dir)["accuracy"]
    return {"recipe": "edgetl train (defaults, empty feature cache)", "wall_s": wall, "test_accuracy": acc,
            "tensorflow_imported": tensorflow_imported,
            "features_s": summary["timings_s"]["features"], "head_s": summary["timings_s"]["head"],
            "feature_engine": summary["feature_engine"], "trained_at": trained_at}


RECIPES = {"seeds": seeds_recipe, "edgetl": edgetl_recipe}


def in_fresh_process(recipe: str, a) -> dict:
    """Run one recipe in a new Python process: its time is from starting the process to the
    end of training (Python start and TensorFlow import included, both recipes pay them; the
    test-set evaluation afterwards is not)."""
    out = Path(tempfile.mkdtemp(prefix="edgetl-speed-")) / "result.json"
    cmd = [sys.executable, __file__, "--recipe", recipe, "--result", str(out), "--train", str(a.train),
           "--test", str(a.test), "--epochs", str(a.epochs), "--alpha", str(a.alpha), "--size", str(a.size)]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    return {**result, "process_wall_s": result["trained_at"] - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=Path, default=SHARED / "datasets/flowers/train")
    p.add_argument("--test", type=Path, default=SHARED / "datasets/flowers/test")
    p.add_argument("--epochs", type=int, default=10, help="the seeds' recipe's epochs")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--recipe", choices=list(RECIPES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--name", default="train_speed", help="write benchmarks/results/NAME.json")
    a = p.parse_args()
    offline_keras_cache()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if a.recipe:  # the child process
        a.result.write_text(json.dumps(RECIPES[a.recipe](a.train, a.test, a.epochs, a.alpha, a.size)))
        return
    from edgetl.bundle.selftest import cpu_fingerprint  # noqa: F401  (the machine line, below)
    from edgetl.train.fast_features import backbone_cache_dir

    seeds = in_fresh_process("seeds", a)
    # The first edgetl run on a machine converts the backbone to TFLite (kept beside the Keras
    # weights); every later run, on any photos, reuses it.
    cached = sorted(backbone_cache_dir().glob("*.tflite")) + sorted(backbone_cache_dir().glob("*.json"))
    aside = Path(tempfile.mkdtemp(prefix="edgetl-speed-aside-"))
    for f in cached:
        shutil.move(str(f), aside / f.name)
    try:
        first = in_fresh_process("edgetl", a)
    finally:
        for f in list(aside.glob("*.tflite")) + list(aside.glob("*.json")):
            if not (backbone_cache_dir() / f.name).exists():
                shutil.move(str(f), backbone_cache_dir() / f.name)
    first["recipe"] += ", first run on the machine (converts the backbone, TensorFlow)"
    ours = in_fresh_process("edgetl", a)
    rows = [[r["recipe"], f"{r['process_wall_s']:.1f}", f"{seeds['process_wall_s'] / r['process_wall_s']:.1f}",
             f"{r['test_accuracy']:.4f}"] for r in (seeds, first, ours)]
    print(f"from a new process to a trained model (Python start + imports included), {cpu_line()}:")
    print(table(["recipe", "wall s", "speed-up", "test accuracy"], rows))
    ratio = seeds["process_wall_s"] / ours["process_wall_s"]
    print(f"speed-up: {ratio:.1f}x; accuracy difference: {100 * (ours['test_accuracy'] - seeds['test_accuracy']):+.1f} points")
    path = write_json(a.name, {"args": {k: str(v) for k, v in vars(a).items()}, "seeds": seeds,
                                      "edgetl_first_run": first, "edgetl": ours, "speedup": ratio})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
