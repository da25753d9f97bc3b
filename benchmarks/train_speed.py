"""The seeds' recipe vs ``edgetl train`` (head only), side by side in one process.

Seeds' recipe: a Keras model with the frozen MobileNetV2 base and a Dense head, trained with
``model.fit`` for N epochs on ``image_dataset_from_directory`` (the backbone runs on every
image in every epoch). edgetl: features computed once (fresh, empty cache), head trained on
them for N epochs. Both use the same training folder with a 20 % validation split, and both
are scored on the same test folder.

    python benchmarks/train_speed.py            # flowers, alpha 1.0, 224, 10 epochs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, offline_keras_cache, table, write_json  # noqa: E402


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
    test = keras.utils.image_dataset_from_directory(str(test_dir), shuffle=False, **kw).map(lambda x, y: (prep(x), y))
    _, acc = model.evaluate(test, verbose=0)
    return {"recipe": "seeds: keras model.fit, frozen base", "wall_s": wall, "test_accuracy": float(acc)}


def edgetl_recipe(train_dir: Path, test_dir: Path, epochs: int, alpha: float, size: int) -> dict:
    from edgetl.predict import evaluate, open_predictor
    from edgetl.train import TrainConfig, train

    out = Path(tempfile.mkdtemp(prefix="edgetl-speed-"))
    t0 = time.perf_counter()
    summary = train(TrainConfig(data_dir=str(train_dir), out_dir=str(out), alpha=alpha, size=size,
                                epochs=epochs, patience=epochs))
    wall = time.perf_counter() - t0
    acc = evaluate(open_predictor(out), test_dir)["accuracy"]
    return {"recipe": "edgetl train (head only, cached features)", "wall_s": wall, "test_accuracy": acc,
            "features_s": summary["timings_s"]["features"], "head_s": summary["timings_s"]["head"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=Path, default=SHARED / "datasets/flowers/train")
    p.add_argument("--test", type=Path, default=SHARED / "datasets/flowers/test")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    offline_keras_cache()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    seeds = seeds_recipe(a.train, a.test, a.epochs, a.alpha, a.size)
    ours = edgetl_recipe(a.train, a.test, a.epochs, a.alpha, a.size)
    ratio = seeds["wall_s"] / ours["wall_s"]
    rows = [[r["recipe"], f"{r['wall_s']:.1f}", f"{r['test_accuracy']:.4f}"] for r in (seeds, ours)]
    print(table(["recipe", "wall s", "test accuracy"], rows))
    print(f"speed-up: {ratio:.1f}x; accuracy difference: {100 * (ours['test_accuracy'] - seeds['test_accuracy']):+.1f} points")
    path = write_json("train_speed", {"args": {k: str(v) for k, v in vars(a).items()}, "seeds": seeds, "edgetl": ours,
                                      "speedup": ratio})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
