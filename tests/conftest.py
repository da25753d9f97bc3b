"""Shared fixtures: real photos and weights from ../shared (or $EDGETL_SHARED), tiny models.

Before anything imports Keras, ``KERAS_HOME`` is pointed at a temporary cache filled from
``shared/weights/keras`` (unless the caller set it), so ``weights='imagenet'`` works offline.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from edgetl.weights import use_offline_weights

from .helpers import (  # noqa: F401  (re-exported for the test modules)
    CORAL,
    FLOWERS,
    HYMENOPTERA,
    SHARED,
    TINY_CLASSES,
    WEIGHTS_035,
    copy_photos,
    export_device_bundle,
    make_tiny_data,
    train_tiny,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_KERAS_HOME_SET = bool(os.environ.get("KERAS_HOME"))
_KERAS_HOME = use_offline_weights(SHARED / "weights/keras")


def pytest_sessionfinish(session, exitstatus):
    """The temporary Keras cache this session made (links to shared/ weights) goes with it."""
    if not _KERAS_HOME_SET and _KERAS_HOME.name.startswith("edgetl-keras-home-"):
        shutil.rmtree(_KERAS_HOME, ignore_errors=True)


def have_tensorflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


# Test modules that need no photos or weights from shared/.
WITHOUT_SHARED = {"test_fileio.py", "test_layout.py"}


def shared_missing() -> str | None:
    """Why the tests that read real photos and weights cannot run, or None when they can."""
    if WEIGHTS_035.is_file() and FLOWERS.is_dir() and HYMENOPTERA.is_dir():
        return None
    return (f"the shared test data (real photos and ImageNet weights) is not under {SHARED}; "
            "set EDGETL_SHARED to the shared/ folder")


def pytest_collection_modifyitems(config, items):
    missing = shared_missing()
    if missing:
        skip_shared = pytest.mark.skip(reason=missing)
        for item in items:
            if item.path.name not in WITHOUT_SHARED:
                item.add_marker(skip_shared)
    if have_tensorflow():
        return
    skip = pytest.mark.skip(reason="TensorFlow is not installed (device-only environment)")
    for item in items:
        if "device" not in item.keywords:
            item.add_marker(skip)


def require_shared():
    missing = shared_missing()
    if missing:
        pytest.skip(missing)


TINY_ARGS = ["--alpha", "0.35", "--size", "96", "--weights", str(WEIGHTS_035)]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Three flower classes: 8 training and 4 validation photos each."""
    require_shared()
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A trained run folder (alpha 0.35, 96x96, real ImageNet weights, 8 head epochs)."""
    return train_tiny(tiny_data, tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def device_bundle(request, tmp_path_factory) -> Path:
    """A bundle with the tiny backbone (TFLite int8 + fp32, ONNX fp32) and replay features.

    In the TensorFlow-free environment it comes from $EDGETL_TEST_BUNDLE (made by
    ``python -m tests.helpers OUT`` in the TensorFlow one).
    """
    env = os.environ.get("EDGETL_TEST_BUNDLE")
    if env:
        return Path(env)
    if not have_tensorflow():
        pytest.fail("no TensorFlow here: set EDGETL_TEST_BUNDLE to a bundle made by 'python -m tests.helpers OUT'")
    run = request.getfixturevalue("tiny_run")
    return export_device_bundle(run, tmp_path_factory.mktemp("device") / "bundle")


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
