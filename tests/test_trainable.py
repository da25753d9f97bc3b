"""The phone path: a trainable TFLite head that trains in stock LiteRT (no TensorFlow here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.bundle import open_bundle
from edgetl.cli import cli
from edgetl.device import HeadTrainConfig, Learner
from edgetl.errors import ConfigError
from edgetl.head.arrays import head_predict
from edgetl.head.fit import add_classes, train_head
from edgetl.head.tflite import TFLiteTrainableHead, config_for, train_with_tflite

from .helpers import HYMENOPTERA

pytestmark = pytest.mark.device
ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))


@pytest.fixture(scope="module")
def bundle(device_bundle):
    return open_bundle(device_bundle)


@pytest.fixture(scope="module")
def features(bundle, tmp_path_factory):
    """Real features: the bundle's replay set plus 6 ants photos through the int8 backbone."""
    learner = Learner.open(bundle.source, store=tmp_path_factory.mktemp("t") / "s.sqlite", threads=1)
    ants, *_ = learner.features(ANTS[:6])
    rx, ry = bundle.replay(learner.backbone_entry)
    learner.close()
    return rx, ry, ants


def test_loads_in_stock_litert_with_four_signatures_and_no_flex(bundle):
    entry = bundle.pick("trainable_head")
    assert entry["builtins_only"] is True and entry["custom_ops"] == []
    assert entry["max_classes"] == len(bundle.labels) + 8 and entry["live_slots"] == [0, 1, 2]
    from ai_edge_litert.interpreter import Interpreter  # the plain interpreter: no Flex delegate exists here

    sigs = Interpreter(model_path=str(bundle.path(entry))).get_signature_list()
    assert set(sigs) == {"infer", "train", "save", "restore"}
    assert sigs["train"] == {"inputs": ["feature", "label"], "outputs": ["loss"]}
    head = TFLiteTrainableHead(bundle.path(entry))
    layers, mask = head.save()
    assert mask.tolist() == [1, 1, 1] + [0] * 8
    np.testing.assert_array_equal(layers[0][0][:, :3], bundle.head()[0][0])


def test_save_restore_round_trips_exactly(bundle):
    head = TFLiteTrainableHead(bundle.path(bundle.pick("trainable_head")))
    rng = np.random.default_rng(7)
    layers = [(rng.normal(size=(1280, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32))]
    head.restore(layers, live=5)
    saved, mask = head.save()
    assert np.array_equal(saved[0][0][:, :5], layers[0][0]) and np.array_equal(saved[0][1][:5], layers[0][1])
    assert not saved[0][0][:, 5:].any() and mask.tolist() == [1] * 5 + [0] * 6
    head.restore(saved, mask=mask)  # the saved state goes back in unchanged
    again, mask2 = head.save()
    assert np.array_equal(again[0][0], saved[0][0]) and np.array_equal(mask2, mask)


def test_masked_slots_are_never_predicted(bundle, features):
    rx, _, ants = features
    head = TFLiteTrainableHead(bundle.path(bundle.pick("trainable_head")))
    probs = head.infer(np.concatenate([rx[:4], ants]))
    assert probs.shape == (10, 11) and np.all(probs[:, 3:] == 0.0)
    np.testing.assert_allclose(probs[:, :3], head_predict(np.concatenate([rx[:4], ants]), bundle.head()), atol=1e-5)


def test_a_class_added_into_a_spare_slot_is_learned(bundle, features):
    rx, ry, ants = features
    x = np.concatenate([rx, ants])
    y = np.concatenate([ry, np.full(len(ants), 3)])
    layers = add_classes(bundle.head(), x, y, [3])
    cfg = config_for(bundle.pick("trainable_head"), epochs=15, batch_size=8)
    trained, losses = train_with_tflite(bundle.path(bundle.pick("trainable_head")), bundle.pick("trainable_head"), layers, x, y, cfg)
    assert trained[-1][0].shape == (1280, 4) and losses[-1] < losses[0]
    pred = head_predict(ants, trained).argmax(1)
    assert (pred == 3).all()
    assert (head_predict(rx, trained).argmax(1) == ry).mean() >= 0.9


def test_tflite_and_numpy_trainers_agree_after_20_epochs(bundle, features):
    rx, ry, ants = features
    x = np.concatenate([rx, ants])
    y = np.concatenate([ry, np.full(len(ants), 3)])
    start = add_classes(bundle.head(), x, y, [3])
    cfg = config_for(bundle.pick("trainable_head"), epochs=20, batch_size=8, seed=5)
    tfl, tfl_losses = train_with_tflite(bundle.path(bundle.pick("trainable_head")), bundle.pick("trainable_head"), start, x, y, cfg)
    npy, np_losses = train_head(start, x, y, cfg)
    moved = np.abs(npy[0][0] - start[0][0]).max()
    assert moved > 1e-2  # the weights really changed
    np.testing.assert_allclose(tfl[0][0], npy[0][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tfl[0][1], npy[0][1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tfl_losses, np_losses, rtol=1e-4)
    assert np.array_equal(head_predict(x, tfl).argmax(1), head_predict(x, npy).argmax(1))


def test_tflite_trainer_refuses_settings_it_cannot_do(bundle, features):
    rx, ry, _ = features
    with pytest.raises(ConfigError, match=r"does one SGD step with learning rate 0.01 and l2 0.0001.*--optimizer sgd"):
        train_with_tflite(bundle.path(bundle.pick("trainable_head")), bundle.pick("trainable_head"), bundle.head(), rx, ry, HeadTrainConfig())


def test_learner_and_cli_with_the_tflite_trainer(device_bundle, tmp_path):
    runner = CliRunner()
    base = ["device", "--bundle", str(device_bundle), "--store", str(tmp_path / "s.sqlite"), "--trainer", "tflite"]
    assert runner.invoke(cli, [*base, "add", "--label", "ants", *map(str, ANTS[:5])]).exit_code == 0
    r = runner.invoke(cli, [*base, "train", "--epochs", "10", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["trainer"] == "tflite" and out["config"]["optimizer"] == "sgd" and out["new_classes"] == ["ants"]
    assert (out["config"]["epochs"], out["config"]["batch_size"]) == (10, 32)  # the phone's step, not the NumPy defaults
    r = runner.invoke(cli, [*base, "train", "--optimizer", "adam"])
    assert r.exit_code == 1 and "does one SGD step" in r.output
