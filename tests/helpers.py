"""Tiny real models for tests, shared by the fixtures and by CI's TensorFlow-free step.

``python -m tests.helpers OUT`` (in the TensorFlow environment) trains the tiny run and
exports the device bundle into OUT, for ``EDGETL_TEST_BUNDLE=OUT/bundle pytest -m device``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGETL_SHARED", ROOT.parent / "shared")).resolve()
WEIGHTS_035 = SHARED / "weights/keras/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
FLOWERS = SHARED / "datasets/flowers"
HYMENOPTERA = SHARED / "datasets/hymenoptera"
CORAL = SHARED / "weights/coral"
TINY_CLASSES = ["daisy", "roses", "sunflowers"]
DEVICE_TARGETS = ["tflite:int8+fp32", "onnx:fp32", "tflite-trainable"]


def copy_photos(src_root: Path, dst_root: Path, classes: list[str], per_class: int, offset: int = 0) -> Path:
    """Copy the first ``per_class`` photos (sorted by name, after ``offset``) of each class."""
    for c in classes:
        (dst_root / c).mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in (src_root / c).iterdir() if p.suffix.lower() == ".jpg")
        for p in files[offset : offset + per_class]:
            shutil.copy(p, dst_root / c / p.name)
    return dst_root


def make_tiny_data(root: Path) -> dict[str, Path]:
    """Three flower classes: 8 training and 4 validation photos each."""
    return {"train": copy_photos(FLOWERS / "train", root / "train", TINY_CLASSES, 8),
            "val": copy_photos(FLOWERS / "test", root / "val", TINY_CLASSES, 4)}


def train_tiny(data: dict[str, Path], out: Path) -> Path:
    """alpha 0.35, 96x96, real ImageNet weights, 8 head epochs."""
    from edgetl.train import TrainConfig, train

    cfg = TrainConfig(data_dir=str(data["train"]), out_dir=str(out), val_dir=str(data["val"]),
                      alpha=0.35, size=96, weights=str(WEIGHTS_035), epochs=8, patience=8, seed=0)
    summary = train(cfg)
    assert summary["num_train"] == 24 and summary["num_val"] == 12
    return out


def export_device_bundle(run: Path, out: Path) -> Path:
    from edgetl.export import export_run

    export_run(run, out, targets=DEVICE_TARGETS, roles=("backbone",), calibration_images=24, max_drop=100.0,
               replay_per_class=8)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1])
    data = make_tiny_data(target / "data")
    export_device_bundle(train_tiny(data, target / "run"), target / "bundle")
    print(target / "bundle")
