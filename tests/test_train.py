"""Workstation training with real MobileNetV2 weights on real photos (alpha 0.35, 96x96)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetl import preprocess
from edgetl.errors import ConfigError, DataError, ModelError

from .conftest import FLOWERS, WEIGHTS_035, copy_photos


def test_run_folder_contents(tiny_run):
    for name in ("head.npz", "labels.txt", "config.json", "run.json", "history.csv",
                 "metrics.json", "training_curves.png", "confusion_matrix.png"):
        assert (tiny_run / name).is_file(), name
    run = json.loads((tiny_run / "run.json").read_text())
    # model.keras: written by a run that imported TensorFlow; built on first use after a quick one.
    assert (tiny_run / "model.keras").is_file() or run["model_keras"].startswith("built on first use")
    assert run["classes"] == ["daisy", "roses", "sunflowers"]
    assert (tiny_run / "labels.txt").read_text() == "daisy\nroses\nsunflowers\n"
    assert run["backbone"]["name"] == "mobilenet_v2" and run["backbone"]["alpha"] == 0.35
    assert run["backbone"]["feature_dim"] == 1280 and run["backbone"]["input_size"] == 96
    assert run["preprocessing"]["scale"] == pytest.approx(1 / 127.5) and run["preprocessing"]["offset"] == [-1, -1, -1]
    assert len(run["train_files"]) == 24 and len(run["val_files"]) == 12
    assert Path(run["data"]["train_dir"]).is_absolute() and Path(run["data"]["val_dir"]).is_absolute()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert np.array(metrics["confusion_matrix"]).sum() == 12
    assert set(metrics["per_class"]) == {"daisy", "roses", "sunflowers"}
    rows = list(csv.DictReader((tiny_run / "history.csv").open()))
    assert rows and rows[0]["stage"] == "head" and float(rows[0]["loss"]) > 0
    with np.load(tiny_run / "head.npz", allow_pickle=False) as z:
        assert z["W0"].shape == (1280, 3) and z["b0"].shape == (3,)
    # Real ImageNet features separate three flower species far above chance (1/3).
    assert run["val_accuracy"] >= 0.6


def test_cached_features_equal_backbone_output(tiny_run, tiny_data):
    from edgetl.train.backbones import build_backbone
    from edgetl.train.features import FeatureCache

    bb = build_backbone("mobilenet_v2", 0.35, 96, str(WEIGHTS_035))
    run = json.loads((tiny_run / "run.json").read_text())
    assert bb.weights_sha256 == run["backbone"]["weights_sha256"]
    cache = FeatureCache(tiny_run / "cache", bb.key(), bb.feature_dim)
    assert len(cache) == 36
    files = sorted((tiny_data["train"] / "roses").iterdir())[:4]
    px = []
    for f in files:
        p, digest = preprocess.load_pixels(f, 96)
        px.append(p)
        assert cache.get(digest) is not None
    direct = np.asarray(bb.model.predict_on_batch(preprocess.normalize(np.stack(px), bb.preprocessing)))
    cached = np.stack([cache.get(preprocess.load_pixels(f, 96)[1]) for f in files])
    # Computed by the backbone's LiteRT conversion (no GPU here), checked against Keras by the run.
    engine = run["feature_engine"]
    assert engine["engine"] == "litert" and engine["used"] and engine["max_relative_difference"] <= 1e-3, engine
    np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-4 * float(np.abs(direct).max()))


def test_a_litert_backbone_that_disagrees_with_keras_is_not_used(tiny_data, tmp_path, monkeypatch, caplog):
    import edgetl.train.fast_features as ff
    from edgetl.train import TrainConfig, train

    monkeypatch.setattr(ff, "AGREEMENT", -1.0)  # no file can agree
    cfg = TrainConfig(data_dir=str(tiny_data["train"]), out_dir=str(tmp_path / "k"), val_dir=str(tiny_data["val"]),
                      alpha=0.35, size=96, weights=str(WEIGHTS_035))
    with caplog.at_level("WARNING", logger="edgetl"):
        summary = train(cfg)
    assert summary["feature_engine"]["engine"] == "keras" and summary["feature_engine"]["reason"] == "disagrees with Keras"
    assert "computing features with Keras" in caplog.text


def test_second_run_reuses_the_cache_and_gives_the_same_head(tiny_run, tiny_data, tmp_path):
    from edgetl.train import TrainConfig, train

    out = tmp_path / "again"
    shutil.copytree(tiny_run / "cache", out / "cache")
    cfg = TrainConfig(data_dir=str(tiny_data["train"]), out_dir=str(out), val_dir=str(tiny_data["val"]),
                      alpha=0.35, size=96, weights=str(WEIGHTS_035), epochs=8, patience=8, seed=0)
    summary = train(cfg)
    assert summary["feature_cache"]["hits"] == 36 and summary["feature_cache"]["computed"] == 0
    first = json.loads((tiny_run / "run.json").read_text())
    assert summary["val_accuracy"] == first["val_accuracy"]
    with np.load(out / "head.npz") as a, np.load(tiny_run / "head.npz") as b:
        np.testing.assert_allclose(a["W0"], b["W0"], atol=1e-6)


def test_reloaded_run_reproduces_validation_accuracy(tiny_run, tiny_data, tmp_path):
    """With the head kept as fitted on the training split, the saved model gives exactly the
    run's validation figures."""
    from edgetl.predict import evaluate, open_predictor
    from edgetl.train import TrainConfig, train

    out = tmp_path / "train_only"
    shutil.copytree(tiny_run / "cache", out / "cache")
    train(TrainConfig(data_dir=str(tiny_data["train"]), out_dir=str(out), val_dir=str(tiny_data["val"]), alpha=0.35,
                      size=96, weights=str(WEIGHTS_035), final_fit="train", seed=0))
    report = evaluate(open_predictor(out), tiny_data["val"])
    run = json.loads((out / "run.json").read_text())
    assert run["head_training"]["fit_on"] == "train"
    assert report["num_images"] == 12
    assert report["accuracy"] == run["val_accuracy"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["confusion_matrix"] == metrics["confusion_matrix"]


def test_default_head_is_the_converged_solution_on_all_photos(tiny_run):
    """The default head: L2 by cross-validation on the training split, then solved to convergence
    on training + validation features; head.npz and model.keras hold that solution."""
    from edgetl.head.solver import solve_softmax
    from edgetl.predict import open_predictor
    from edgetl.train.run import Run

    run = json.loads((tiny_run / "run.json").read_text())
    h = run["head_training"]
    assert h["solver"] == "lbfgs" and h["fit_on"] == "train+val" and h["num_fit"] == 36 and h["converged"]
    assert h["l2"] in [r["l2"] for r in h["cv"]] and h["l2_chosen_by"].startswith("5-fold")
    r = Run(tiny_run)
    cache_path = Path(run["feature_cache"]["path"])
    with np.load(cache_path, allow_pickle=False) as z:
        cache = dict(zip(z["digests"].tolist(), z["features"]))
    x, y = [], []
    for split in ("train", "val"):
        for s in r.samples(split):
            x.append(cache[preprocess.load_pixels(s.path, 96)[1]])
            y.append(s.label)
    x, y = np.array(x, np.float32), np.array(y)
    solved, _ = solve_softmax(x, y, 3, h["l2"], balance=True)
    with np.load(tiny_run / "head.npz") as z:
        saved = [(z["W0"], z["b0"])]
    from edgetl.head.arrays import head_predict

    np.testing.assert_allclose(head_predict(x, saved), head_predict(x, solved), atol=1e-3)
    keras_probs = open_predictor(tiny_run).predict(preprocess.normalize(
        np.stack([preprocess.load_pixels(s.path, 96)[0] for s in r.samples("val")]), r.preprocessing))
    np.testing.assert_allclose(keras_probs, head_predict(x[24:], saved), atol=1e-4)
    # The validation figures are those of the head fitted on the training split alone.
    assert run["val_accuracy"] == json.loads((tiny_run / "metrics.json").read_text())["accuracy"]


def test_bad_files_are_skipped_counted_or_fatal_in_strict_mode(tmp_path):
    from edgetl.train import TrainConfig, train

    data = copy_photos(FLOWERS / "train", tmp_path / "d", ["daisy", "tulips"], 4)
    (data / "daisy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "tulips" / "empty.png").write_bytes(b"")
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "r"), val_split=0.25, alpha=0.35, size=96,
                      weights=str(WEIGHTS_035), epochs=1)
    summary = train(cfg)
    assert summary["num_skipped"] == 2
    assert sorted(s["file"] for s in summary["skipped"]) == ["daisy/broken.jpg", "tulips/empty.png"]
    assert any("the file is empty (0 bytes)" in s["reason"] for s in summary["skipped"])
    assert summary["num_train"] + summary["num_val"] == 8
    strict = TrainConfig(**{**cfg.to_dict(), "strict": True, "hidden": ()})
    with pytest.raises(DataError, match=r"strict mode"):
        train(strict, force=True)
    # The failed run left the earlier one as it was.
    assert json.loads((tmp_path / "r" / "run.json").read_text())["num_skipped"] == 2


def test_class_with_only_bad_images_is_a_clear_error(tmp_path):
    from edgetl.train import TrainConfig, train

    data = copy_photos(FLOWERS / "train", tmp_path / "d", ["daisy"], 3)
    (data / "ghosts").mkdir()
    for i in range(3):
        (data / "ghosts" / f"{i}.jpg").write_text("not a photo")
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "r"), alpha=0.35, size=96,
                      weights=str(WEIGHTS_035), epochs=1)
    with pytest.raises(DataError, match=r"class\(es\) \['ghosts'\] have no usable training image"):
        train(cfg)


def test_missing_imagenet_weights_offline_names_the_file(tmp_path, monkeypatch):
    from edgetl.train.backbones import build_backbone

    (tmp_path / "models").mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    import keras

    monkeypatch.setattr(keras.src.utils.file_utils, "urlretrieve", _no_network, raising=False)
    with pytest.raises(ModelError) as err:
        build_backbone("mobilenet_v2", 0.35, 128, "imagenet")
    msg = str(err.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_128_no_top.h5" in msg
    assert str(tmp_path / "models") in msg and "--weights" in msg


def _no_network(*args, **kwargs):
    raise OSError("[Errno -2] Name or service not known")


def test_backbone_argument_errors():
    from edgetl.train.backbones import build_backbone

    with pytest.raises(ConfigError, match=r"unknown backbone 'mobilenet_v3'; did you mean 'mobilenet_v2'\?"):
        build_backbone("mobilenet_v3", 1.0, 224, "none")
    with pytest.raises(ConfigError, match=r"alpha for 'mobilenet_v2' must be one of .*received 0.4"):
        build_backbone("mobilenet_v2", 0.4, 224, "none")
    with pytest.raises(ConfigError, match=r"input size .* between 96 and 224; received 64"):
        build_backbone("mobilenet_v2", 1.0, 64, "none")
    with pytest.raises(ModelError, match=r"weights file '/nonexistent.h5' does not exist"):
        build_backbone("mobilenet_v2", 1.0, 224, "/nonexistent.h5")


def test_weights_file_of_another_width_is_refused():
    from edgetl.train.backbones import build_backbone

    with pytest.raises(ModelError, match=r"does not fit backbone mobilenet_v2 \(alpha 0.5\)"):
        build_backbone("mobilenet_v2", 0.5, 96, str(WEIGHTS_035))


@pytest.mark.slow
def test_fine_tune_keeps_batchnorm_frozen_and_changes_top_convs(tiny_data, tmp_path):
    import keras

    from edgetl.train import TrainConfig, train
    from edgetl.train.run import Run

    cfg = TrainConfig(data_dir=str(tiny_data["train"]), out_dir=str(tmp_path / "ft"), val_dir=str(tiny_data["val"]),
                      alpha=0.35, size=96, weights=str(WEIGHTS_035), fine_tune=True,
                      fine_tune_epochs=2, fine_tune_views=2, batch_size=8, fine_tune_keep="always")
    summary = train(cfg)
    ft = summary["fine_tune"]
    assert ft["from_layer"] == ft["cut_at"] == "block_10_expand" and ft["layers_trained"] > 0 and ft["kept"]
    # searched on the training photos with the validation ones, then fitted again on all of them
    assert ft["fit_on"] == "train+val" and ft["num_fit"] == summary["num_train"] + summary["num_val"]
    assert 1 <= ft["best_epoch"] == ft["epochs_all"] <= 2
    names = [layer.name for layer in Run(tmp_path / "ft").backbone_model.layers]
    below = names.index("block_10_expand")
    tuned = Run(tmp_path / "ft").backbone_model
    fresh = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False,
                                           weights=str(WEIGHTS_035), pooling="avg")
    changed_conv = 0
    for a, b in zip(tuned.layers, fresh.layers):
        for wa, wb in zip(a.weights, b.weights):
            same = np.array_equal(np.asarray(wa), np.asarray(wb))
            if isinstance(a, keras.layers.BatchNormalization):
                assert same, f"BatchNorm {a.name} changed during fine-tuning"
            elif not same:
                changed_conv += 1
    assert changed_conv > 0
    for a, b in zip(tuned.layers[:below], fresh.layers[:below]):  # the trunk below the cut is untouched
        assert all(np.array_equal(np.asarray(wa), np.asarray(wb)) for wa, wb in zip(a.weights, b.weights)), a.name
    assert tuned.layers[1].name == fresh.layers[1].name
    assert np.array_equal(np.asarray(tuned.layers[1].weights[0]), np.asarray(fresh.layers[1].weights[0]))
    from edgetl.train.backbones import weights_digest

    assert summary["backbone"]["weights_sha256"] == weights_digest(tuned) != weights_digest(fresh)


def test_fine_tuning_that_loses_to_the_head_on_the_validation_photos_is_undone(tiny_data, tmp_path):
    """--fine-tune-keep better (the default): a fine-tuned model less accurate than the head alone on
    the validation photos (here wrecked by a learning rate of 3) leaves the run the head alone:
    the pretrained backbone, the head-only run's head and validation figures."""
    from edgetl.train import TrainConfig, train

    common = dict(data_dir=str(tiny_data["train"]), val_dir=str(tiny_data["val"]), alpha=0.35, size=96,
                  weights=str(WEIGHTS_035), batch_size=8)
    summary = train(TrainConfig(out_dir=str(tmp_path / "ft"), fine_tune=True, fine_tune_epochs=2, fine_tune_views=1,
                                fine_tune_lr=3.0, **common))
    alone = train(TrainConfig(out_dir=str(tmp_path / "head"), **common))
    ft = summary["fine_tune"]
    assert ft["kept"] is False and ft["fit_on"] == "none"
    assert ft["validation_accuracy"] <= ft["head_validation_accuracy"] == alone["val_accuracy"]
    assert summary["val_accuracy"] == alone["val_accuracy"] and summary["val_loss"] == pytest.approx(alone["val_loss"])
    assert summary["backbone"]["weights_sha256"] == alone["backbone"]["weights_sha256"]
    with np.load(tmp_path / "ft" / "head.npz") as a, np.load(tmp_path / "head" / "head.npz") as b:
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], atol=1e-6)


# TensorFlow's MirroredStrategy over two logical CPUs, as over two GPUs (MirroredStrategy() itself
# takes the GPUs, or the one CPU).
_TWO_TF_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
_Mirrored = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda *a, **k: _Mirrored(["/cpu:0", "/cpu:1"])
from edgetl.cli.main import main
main()
"""


@pytest.mark.slow
def test_tensorflow_mirrored_strategy_over_two_devices_fine_tunes_like_one(tiny_data, tmp_path):
    """--distribute mirrored under TensorFlow with two replicas: features, the trunk's views and
    fine-tuning run (Keras' predict_on_batch stacks every replica's answer: edgetl predicts on the
    primary weights), to the one-device head within what the replicas' own dropout draws move."""
    import os
    import subprocess
    import sys

    args = ["train", str(tiny_data["train"]), "--val", str(tiny_data["val"]), "--alpha", "0.35", "--size", "96",
            "--weights", str(WEIGHTS_035), "--fine-tune", "--fine-tune-epochs", "2", "--fine-tune-views", "2",
            "--fine-tune-keep", "always", "--json"]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    runs = {}
    for name, extra in (("one", []), ("two", ["--distribute", "mirrored"])):
        r = subprocess.run([sys.executable, "-c", _TWO_TF_CPUS, *args, "--out", str(tmp_path / name), *extra],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = json.loads(r.stdout)
    assert runs["two"]["devices"]["replicas"] == 2 and runs["one"]["devices"]["replicas"] == 1
    assert runs["two"]["feature_engine"]["used"]  # the LiteRT check against Keras passed (same rows)
    assert runs["two"]["num_val"] == runs["one"]["num_val"] == 12
    assert abs(runs["two"]["val_accuracy"] - runs["one"]["val_accuracy"]) <= 1 / 12 + 1e-9
    with np.load(tmp_path / "one" / "head.npz") as a, np.load(tmp_path / "two" / "head.npz") as b:
        for k in a.files:
            np.testing.assert_allclose(b[k], a[k], atol=5e-3)


def test_multiworker_under_tensorflow_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    """Keras 3 cannot fit under MultiWorkerMirroredStrategy (keras-team/keras#20585): refused up
    front, pointing to JAX, instead of a traceback from inside fit."""
    from edgetl.train import TrainConfig, train

    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    cfg = TrainConfig(data_dir=str(tiny_data["train"]), out_dir=str(tmp_path / "w"), alpha=0.35, size=96,
                      weights=str(WEIGHTS_035), epochs=1, distribute="multiworker")
    with pytest.raises(ConfigError, match="multiworker runs under JAX"):
        train(cfg)
    assert not (tmp_path / "w").exists()


def test_the_default_run_trains_without_tensorflow_once_its_backbone_is_recorded(tiny_run, tiny_data, tmp_path):
    """After one run converted (or checked) the backbone's LiteRT file, the default head-only run
    imports no TensorFlow or Keras (a fresh process), gives the same head, and the run folder
    builds model.keras from the backbone and head.npz when it is first needed."""
    import subprocess
    import sys

    from edgetl.train import TrainConfig
    from edgetl.train.quick import find
    from edgetl.train.run import Run

    out = tmp_path / "quick"
    cfg = dict(data_dir=str(tiny_data["train"]), out_dir=str(out), val_dir=str(tiny_data["val"]), alpha=0.35,
               size=96, weights=str(WEIGHTS_035), seed=0)
    assert find(TrainConfig(**cfg)) is not None
    assert find(TrainConfig(**cfg, fine_tune_layers=10)) is None and find(TrainConfig(**cfg, augment=True)) is None
    code = ("import json, sys\nfrom edgetl.train import TrainConfig, train\n"
            f"s = train(TrainConfig(**{cfg!r}))\n"
            "print(json.dumps({'imported': sorted(m for m in ('tensorflow', 'keras') if m in sys.modules), "
            "'engine': s['feature_engine']}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["imported"] == [] and doc["engine"]["tensorflow"] == "not imported", doc
    assert not (out / "model.keras").exists()
    with np.load(out / "head.npz") as a, np.load(tiny_run / "head.npz") as b:
        np.testing.assert_allclose(a["W0"], b["W0"], atol=1e-6)
        np.testing.assert_allclose(a["b0"], b["b0"], atol=1e-6)
    run = Run(out)
    x, _, bad = preprocess.load_batch([s.path for s in run.samples("val")], run.preprocessing)
    assert not bad
    probs = np.asarray(run.classifier.predict(x, verbose=0))
    assert (out / "model.keras").is_file()  # built once, kept
    from edgetl.head.arrays import head_predict

    feats = np.asarray(run.backbone_model.predict(x, verbose=0))
    np.testing.assert_allclose(probs, head_predict(feats, run.head()), atol=1e-5)


# As where TensorFlow is not installed at all (the GPU machine): importing it fails and importlib
# finds no such module (and, as there, "tensorflow" never appears in sys.modules, which Keras reads).
_NO_TF = """
import importlib.abc, importlib.util, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] == "tensorflow" else _find(n, *a)
from edgetl.cli.main import main
main()
"""


@pytest.mark.slow
def test_jax_backend_fine_tunes_without_tensorflow_and_the_run_exports_with_it(tiny_data, tmp_path):
    """KERAS_BACKEND=jax: `edgetl train --fine-tune` where TensorFlow cannot be imported; then
    `edgetl export` (TensorFlow) of that run folder, its files checked against Keras."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax")
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    train = subprocess.run(
        [sys.executable, "-c", _NO_TF, "train", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
         "--out", str(run), "--alpha", "0.35", "--size", "96", "--weights", str(WEIGHTS_035), "--fine-tune",
         "--fine-tune-epochs", "2", "--fine-tune-views", "2", "--fine-tune-keep", "always", "--json"],
        env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    summary = json.loads(train.stdout)
    assert summary["devices"]["backend"] == "jax"
    # features: Keras on JAX, or the LiteRT file an earlier TensorFlow run made; never a conversion
    fe = summary["feature_engine"]
    assert fe["engine"] == "keras" or (fe["engine"] == "litert" and not fe["converted"])
    assert summary["fine_tune"]["fit_on"] == "train+val" and summary["fine_tune"]["layers_trained"] > 0
    # the head on augmented photos (Keras' augmentation layers, backend-agnostic) also runs there
    aug = subprocess.run(
        [sys.executable, "-c", _NO_TF, "train", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
         "--out", str(tmp_path / "augmented"), "--alpha", "0.35", "--size", "96", "--weights", str(WEIGHTS_035),
         "--augment", "--epochs", "2", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert aug.returncode == 0, aug.stderr[-2000:]
    assert json.loads(aug.stdout)["head_training"]["solver"] == "adam"
    env["KERAS_BACKEND"] = "tensorflow"
    export = subprocess.run(
        [sys.executable, "-m", "edgetl.cli.main", "export", str(run), "-f", "tflite:fp32", "--out", str(bundle),
         "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backbone"]["weights_sha256"] == summary["backbone"]["weights_sha256"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jax_data_parallel_on_two_devices_and_two_processes_gives_the_one_device_head(tiny_data, tmp_path):
    """--distribute mirrored under JAX (keras.distribution.DataParallel) on two host devices
    (XLA_FLAGS=--xla_force_host_platform_device_count=2), and --distribute multiworker in two
    processes on localhost (jax.distributed, Gloo between them): the fine-tuned head of one device.
    Then a process that sees other photos than process 0 stops both with an error saying so."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax")
    args = ["train", str(tiny_data["train"]), "--val", str(tiny_data["val"]), "--alpha", "0.35", "--size", "96",
            "--weights", str(WEIGHTS_035), "--fine-tune", "--fine-tune-epochs", "2", "--fine-tune-views", "2",
            "--fine-tune-keep", "always", "--json"]
    base = {**os.environ, "KERAS_BACKEND": "jax"}

    def processes(name: str, data_of=lambda i: args):
        env = {**base, "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{_free_port()}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
        procs = [subprocess.Popen([sys.executable, "-c", _NO_TF, *data_of(i), "--out", str(tmp_path / f"{name}{i}"),
                                   "--distribute", "multiworker"], env={**env, "KERAS_DISTRIBUTION_PROCESS_ID": str(i)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outs)]

    heads = []
    for n, extra in ((1, []), (2, ["--distribute", "mirrored"])):
        out = tmp_path / f"d{n}"
        r = subprocess.run([sys.executable, "-c", _NO_TF, *args, "--out", str(out), *extra],
                           env={**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["devices"]["replicas"] == n
        heads.append(dict(np.load(out / "head.npz")))
    for i, (_, stdout, stderr) in enumerate(processes("p")):
        assert stdout and json.loads(stdout)["devices"]["replicas"] == 2, stderr[-2000:]  # --json stays JSON
        heads.append(dict(np.load(tmp_path / f"p{i}" / "head.npz")))
    for h in heads[1:]:
        for k in heads[0]:
            np.testing.assert_allclose(h[k], heads[0][k], atol=1e-5)

    other = tmp_path / "other"
    shutil.copytree(tiny_data["train"], other)
    next(other.glob("daisy/*")).unlink()
    results = processes("m", lambda i: [args[0], str(other) if i else args[1], *args[2:]])
    for code, _, stderr in results:
        assert code == 1 and "see different photos, labels or options than process 0" in stderr, stderr[-2000:]
        assert "Traceback" not in stderr


def test_the_backend_is_read_as_keras_reads_it(tmp_path, monkeypatch):
    """KERAS_BACKEND, else keras.json in $KERAS_HOME, else tensorflow: what the config checks
    (multiworker needs JAX) and the extras check see without importing Keras."""
    from edgetl.train.backend import wanted

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert wanted() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "jax", "floatx": "float32"}')
    assert wanted() == "jax"
    (tmp_path / "keras.json").write_text("{not json")
    assert wanted() == "tensorflow"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert wanted() == "torch"
