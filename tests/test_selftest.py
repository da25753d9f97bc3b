"""The bundle's self-test: references made at export, checked on the device's CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.bundle import MANIFEST, BundleWriter, open_bundle
from edgetl.bundle.selftest import References
from edgetl.cli import cli
from edgetl.device import Learner
from edgetl.errors import BundleError
from edgetl.preprocess import Preprocessing


@pytest.mark.device
def test_export_writes_references_and_per_file_thresholds(device_bundle):
    b = open_bundle(device_bundle)
    st = b.manifest["self_test"]
    assert st["file"] == "references.npz" and 8 <= st["photos"] <= 24
    assert st["verified_on"]["machine"] and "id" in st["verified_on"]
    refs = References(b.root / st["file"])
    assert refs.decoded_identically and len(refs) == st["photos"]
    assert refs.pixels.shape[1:] == (b.preprocessing.size, b.preprocessing.size, 3)
    assert (b.root / st["file"]).stat().st_size < 400_000
    for e in [e for e in b.files if e["role"] in ("backbone", "classifier")]:
        t = e["self_test"]
        assert t["min_cosine_mean"] <= t["cosine_mean"] <= 1.0 and t["min_agreement"] <= t["agreement"]
        if e.get("precision") == "fp32":
            assert t["cosine_mean"] > 0.9999  # float files compute what Keras computes


@pytest.mark.device
def test_device_check_passes_on_a_good_bundle_and_info_shows_it(device_bundle, tmp_path):
    runner = CliRunner()
    base = ["device", "--bundle", str(device_bundle), "--store", str(tmp_path / "s.sqlite"), "--threads", "1"]
    r = runner.invoke(cli, [*base, "check", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and {f["file"] for f in doc["files"]} >= {"backbone_int8.tflite", "backbone_fp32.onnx"}
    assert all(f["ok"] for f in doc["files"]), doc
    r = runner.invoke(cli, [*base, "info"])
    assert r.exit_code == 0 and "last check:" in r.output and "passed" in r.output and "cpu:" in r.output


@pytest.mark.device
def test_first_load_checks_once_per_cpu_and_caches_in_the_store(device_bundle, tmp_path):
    lr = Learner.open(device_bundle, store=tmp_path / "s.sqlite", threads=1)
    key = lr.backbone_check.key()
    cached = json.loads(lr.store.get_meta(key))
    assert cached["ok"] and cached["file"] == lr.backbone_entry["file"]
    lr.close()
    lr = Learner.open(device_bundle, store=tmp_path / "s.sqlite", threads=1)  # from the cache
    assert json.loads(lr.store.get_meta(key))["checked"] == cached["checked"]
    lr.close()


def test_a_backbone_far_from_its_references_is_refused_with_a_clear_message(tiny_run, device_bundle, tmp_path):
    """A badly quantized int8 backbone (calibrated on one black image), put into the bundle through
    the normal writer so that every hash is right: the device refuses it on first load."""
    from edgetl.convert.source import ExportSource
    from edgetl.export.config import ExportConfig
    from edgetl.export.tflite import export as tflite_export
    from edgetl.train.run import Run

    run = Run(tiny_run)
    size = run.preprocessing.size
    black = np.full((1, size, size, 3), -1.0, np.float32)
    src = ExportSource("backbone", run.backbone_model, tmp_path, black)
    bad_file = tmp_path / "bad_int8.tflite"
    tflite_export(src, bad_file, "int8", ExportConfig())

    target = tmp_path / "tampered"
    manifest = json.loads((device_bundle / MANIFEST).read_text())
    with BundleWriter(target) as w:
        for e in manifest["files"]:
            src = bad_file if e["file"] == "backbone_int8.tflite" else device_bundle / e["file"]
            w.copy(src, e["file"], e["role"], **{k: v for k, v in e.items() if k not in ("file", "role", "bytes", "sha256")})
        kept = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "name", "created", "files",
                                                                "manifest_sha256")}
        w.commit(kept.pop("labels"), Preprocessing.from_dict(kept.pop("preprocessing")), kept.pop("feature_dim"),
                 kept.pop("backbone"), kept.pop("tools"), **kept)
    open_bundle(target)  # every hash is right

    with pytest.raises(BundleError) as err:
        Learner.open(target, store=tmp_path / "s.sqlite", precision="int8", backend="litert")
    msg = str(err.value)
    assert "backbone_int8.tflite does not compute on this CPU" in msg
    assert "mean cosine to the float model" in msg and "expected >=" in msg
    assert "--backend/--precision" in msg and "backbone_fp32.tflite" in msg and "edgetl device check" in msg

    # A new store without --backend/--precision takes the next file that passes here, and says so.
    lr = Learner.open(target, store=tmp_path / "auto.sqlite", threads=1)
    assert lr.backbone_entry["file"] != "backbone_int8.tflite"
    assert json.loads(lr.store.get_meta("self_test:last"))["ok"]
    lr.close()

    r = CliRunner().invoke(cli, ["device", "--bundle", str(target), "--store", str(tmp_path / "c.sqlite"),
                                 "--precision", "fp32", "--backend", "litert", "check", "--json"])
    assert r.exit_code == 1, r.output
    files = {f["file"]: f for f in json.loads(r.stdout)["files"]}
    assert files["backbone_int8.tflite"]["ok"] is False and files["backbone_fp32.tflite"]["ok"] is True
