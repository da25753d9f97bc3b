"""Shared fixtures: real photos and weights from ../shared (or $EDGETL_SHARED), tiny models.

Before anything imports Keras, ``KERAS_HOME`` is pointed at a temporary cache filled from
``shared/weights/keras`` (unless the caller set it), so ``weights='imagenet'`` works offline.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGETL_SHARED", ROOT.parent / "shared")).resolve()
WEIGHTS_035 = SHARED / "weights/keras/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
FLOWERS = SHARED / "datasets/flowers"
HYMENOPTERA = SHARED / "datasets/hymenoptera"
CORAL = SHARED / "weights/coral"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if "KERAS_HOME" not in os.environ:
    _home = Path(tempfile.mkdtemp(prefix="edgetl-keras-home-"))
    (_home / "models").mkdir()
    for f in (SHARED / "weights/keras").glob("*.h5"):
        os.symlink(f, _home / "models" / f.name)
    os.environ["KERAS_HOME"] = str(_home)


def have_tensorflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def pytest_collection_modifyitems(config, items):
    if have_tensorflow():
        return
    skip = pytest.mark.skip(reason="TensorFlow is not installed (device-only environment)")
    for item in items:
        if "device" not in item.keywords:
            item.add_marker(skip)


def require_shared():
    if not WEIGHTS_035.is_file() or not FLOWERS.is_dir():
        pytest.fail(f"shared test data not found under {SHARED}; set EDGETL_SHARED to the shared/ folder")


def copy_photos(src_root: Path, dst_root: Path, classes: list[str], per_class: int, offset: int = 0) -> Path:
    """Copy the first ``per_class`` photos (sorted by name, after ``offset``) of each class."""
    for c in classes:
        (dst_root / c).mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in (src_root / c).iterdir() if p.suffix.lower() == ".jpg")
        for p in files[offset : offset + per_class]:
            shutil.copy(p, dst_root / c / p.name)
    return dst_root


TINY_CLASSES = ["daisy", "roses", "sunflowers"]
TINY_ARGS = ["--alpha", "0.35", "--size", "96", "--weights", str(WEIGHTS_035)]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Three flower classes: 8 training and 4 validation photos each."""
    require_shared()
    root = tmp_path_factory.mktemp("tiny")
    train = copy_photos(FLOWERS / "train", root / "train", TINY_CLASSES, 8)
    val = copy_photos(FLOWERS / "test", root / "val", TINY_CLASSES, 4)
    return {"train": train, "val": val}


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A trained run folder (alpha 0.35, 96x96, real ImageNet weights, 8 head epochs)."""
    from edgetl.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(
        data_dir=str(tiny_data["train"]), out_dir=str(out), val_dir=str(tiny_data["val"]),
        alpha=0.35, size=96, weights=str(WEIGHTS_035), epochs=8, patience=8, seed=0,
    )
    summary = train(cfg)
    assert summary["num_train"] == 24 and summary["num_val"] == 12
    return out


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
