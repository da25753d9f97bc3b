"""Export: every format x precision, run in its real runtime, compared with Keras on real photos."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl import preprocess
from edgetl.bundle import open_bundle
from edgetl.cli import cli
from edgetl.errors import BundleError, ExportError
from edgetl.formats import FLOAT_ERROR, FORMATS
from edgetl.runtime import open_model

from .conftest import CORAL


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    from edgetl.export import export_run

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    report = export_run(tiny_run, out, targets=["tflite:all", "onnx:all"], calibration_images=24,
                        max_drop=100.0, replay_per_class=4, make_zip=True)
    return out, report


@pytest.fixture(scope="session")
def val_arrays(tiny_run):
    from edgetl.train.run import Run

    run = Run(tiny_run)
    samples = run.samples("val")
    x, _, bad = preprocess.load_batch([s.path for s in samples], run.preprocessing)
    assert not bad
    return run, x, np.array([s.label for s in samples])


def test_every_format_and_precision_is_in_the_bundle(tiny_bundle):
    out, report = tiny_bundle
    b = open_bundle(out)
    got = {(e["role"], e["format"], e["precision"]) for e in b.files if e["role"] in ("classifier", "backbone")}
    want = {(r, f.name, p) for f in FORMATS.values() if "classifier" in f.roles for p in f.precisions
            for r in ("classifier", "backbone")}
    assert got == want
    assert len(report["files"]) == len(want)
    assert b.labels == ["daisy", "roses", "sunflowers"]
    assert b.manifest["tools"]["tensorflow"] and b.manifest["tools"]["edgetl"]
    int8 = next(e for e in b.files if e["file"] == "backbone_int8.tflite")
    # Mixed int8 (the default): float I/O; the layers int8 hurt most were measured and kept float.
    assert int8["input"]["dtype"] == "float32" and int8["quantization"]["float_error_threshold"] == FLOAT_ERROR
    assert all(x["error_steps"] > FLOAT_ERROR for x in int8["quantization"]["float_layers"])
    assert int8["replay"] == "replay_backbone_int8_tflite.npz" and int8["flex_ops"] is False
    # The measured refit recipe (README), pinned: it must not drift with the device trainer's defaults.
    refit = int8["head_refit"]
    assert {k: refit[k] for k in ("epochs", "batch_size", "learning_rate", "optimizer", "l2", "balance",
                                  "targets", "held_out_every")} == {
        "epochs": 1000, "batch_size": 1 << 20, "learning_rate": 1e-3, "optimizer": "adam", "l2": 0.0,
        "balance": False, "targets": "float model probabilities", "held_out_every": 5}
    # Early-stopped on held-out training photos: a re-fitted head only where it beat the float head there.
    if refit["steps"]:
        assert int8["head"] == "head_backbone_int8_tflite.npz" and refit["held_out_kl"] < refit["float_head_held_out_kl"]
    else:
        assert "head" not in int8
    onnx8 = next(e for e in b.files if e["file"] == "backbone_int8.onnx")
    assert onnx8["replay"] == "replay_backbone_int8_onnx.npz"
    # The session option that keeps ONNX Runtime's int8 exact on AVX2-only x86: in the manifest, in
    # the file's own metadata for users outside edgetl, and set by edgetl's runner.
    from edgetl.runtime import ONNX_SESSION_CONFIG, OnnxRunner
    assert onnx8["onnxruntime_session_config"] == ONNX_SESSION_CONFIG == {"session.x64quantprecision": "1"}
    runner = OnnxRunner(out / "backbone_int8.onnx", threads=1)
    assert json.loads(runner.metadata["onnxruntime_session_config"]) == ONNX_SESSION_CONFIG
    assert "session.x64quantprecision" in runner.metadata["cpu_notes"]
    assert runner.session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    assert ("head" in onnx8) == (onnx8["head_refit"]["steps"] > 0)
    names = [e["file"] for e in b.files]
    assert len(names) == len(set(names))
    feats, labels = b.replay(int8)
    assert feats.shape == (12, 1280) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_replay_holds_that_backbone_files_features_in_float16(tiny_bundle, tiny_run):
    from edgetl.data import load_samples
    from edgetl.train.run import Run

    out, _ = tiny_bundle
    b = open_bundle(out)
    run = Run(tiny_run)
    for entry in (e for e in b.files if e.get("replay")):
        with np.load(out / entry["replay"]) as z:
            assert z["features"].dtype == np.float16 and z["labels"].dtype == np.int64
        feats, labels = b.replay(entry)
        # The first 4 training photos of each class, through THIS file (int8 ones via the head refit's pass).
        firsts = [s for c in range(3) for s in [t for t in run.samples("train") if t.label == c][:4]]
        x, y, _ = load_samples(firsts, run.preprocessing)
        ref = open_model(out / entry["file"]).run(x)
        assert labels.tolist() == y.tolist()
        np.testing.assert_allclose(feats, ref, rtol=1e-3, atol=1e-3, err_msg=entry["file"])  # float16 rounding


def test_float_files_match_keras_exactly(tiny_bundle, val_arrays):
    out, _ = tiny_bundle
    run, x, _ = val_arrays
    ref_probs = np.asarray(run.classifier.predict(x, verbose=0))
    ref_feats = np.asarray(run.backbone_model.predict(x, verbose=0))
    for name, ref in (("classifier_fp32.tflite", ref_probs), ("classifier_fp32.onnx", ref_probs),
                      ("backbone_fp32.tflite", ref_feats), ("backbone_fp32.onnx", ref_feats)):
        got = np.concatenate([open_model(out / name).run(x[i : i + 1]) for i in range(len(x))])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=name)


def test_quantized_files_stay_close_to_keras_on_real_photos(tiny_bundle):
    _, report = tiny_bundle
    by_file = {v["file"]: v for v in report["files"]}
    assert report["num_val_images"] == 12
    for name, v in by_file.items():
        if name.startswith("backbone"):
            bound = 0.999 if ("fp16" in name or "fp32" in name) else 0.95
            assert v["cosine_mean"] >= bound, (name, v["cosine_mean"])
        else:
            bound = 0.999 if ("fp16" in name or "fp32" in name) else 0.75
            assert v["top1_agreement"] >= bound, (name, v["top1_agreement"])


def test_file_sizes_shrink_with_precision(tiny_bundle):
    out, _ = tiny_bundle
    size = {p.name: p.stat().st_size for p in out.iterdir()}
    assert size["backbone_int8.tflite"] < 0.45 * size["backbone_fp32.tflite"]
    assert size["backbone_fp16.tflite"] < 0.6 * size["backbone_fp32.tflite"]
    assert size["backbone_int8.onnx"] < 0.45 * size["backbone_fp32.onnx"]


def test_type_check_catches_a_wrong_precision(tiny_bundle):
    from edgetl.convert.checks import check_onnx, check_tflite

    out, _ = tiny_bundle
    with pytest.raises(ExportError, match=r"classifier_fp32.tflite was asked to be TFLite int8 \(io int8\) but its "
                                          r"input/output are float32/float32, expected int8; it holds \d+ float32 tensors"):
        check_tflite(out / "classifier_fp32.tflite", "int8", io="int8")
    with pytest.raises(ExportError, match=r"asked to be TFLite fp32 .* int8"):
        check_tflite(out / "classifier_dynamic.tflite", "fp32")
    with pytest.raises(ExportError, match=r"asked to be TFLite fp16 .* no float16 tensors"):
        check_tflite(out / "classifier_fp32.tflite", "fp16")
    with pytest.raises(ExportError, match=r"asked to be ONNX int8 but it has 0 quantize/dequantize nodes"):
        check_onnx(out / "classifier_fp32.onnx", "int8")
    # Mixed int8 (the default): int8 convolutions, float I/O; a classifier's head stays float.
    info = check_tflite(out / "backbone_int8.tflite", "int8", io="float", mixed=True)
    assert info["input"]["dtype"] == "float32" and info["tensor_dtypes"]["int8"] > 50
    info = check_tflite(out / "classifier_int8.tflite", "int8", io="float", float_ops=("FULLY_CONNECTED", "SOFTMAX"))
    assert info["ops"]["DEQUANTIZE"] >= 1 and info["ops"]["FULLY_CONNECTED"] >= 1 and info["ops"]["CONV_2D"] > 10
    with pytest.raises(ExportError, match=r"not int8 convolutions with float parts"):
        check_tflite(out / "classifier_fp32.tflite", "int8", io="float", float_ops=("FULLY_CONNECTED", "SOFTMAX"))


def test_changed_byte_is_refused(tiny_bundle, tiny_data, tmp_path):
    out, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    target = copy / "backbone_int8.tflite"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"backbone_int8.tflite has sha256 .* the manifest says .* changed or damaged"):
        open_bundle(copy)
    photo = sorted((tiny_data["val"] / "daisy").iterdir())[0]
    res = CliRunner().invoke(cli, ["predict", str(copy), str(photo)])
    assert res.exit_code == 1 and "changed or damaged" in res.output


def test_manifest_problems_are_refused(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(BundleError, match=r"format_version 99 is not supported; this edgetl reads 1"):
        open_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json is not valid JSON"):
        open_bundle(copy)
    os.unlink(copy / "manifest.json")
    with pytest.raises(BundleError, match=r"no manifest.json; expected a folder or zip written by 'edgetl export'"):
        open_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps(m))
    os.unlink(copy / "head.npz")
    with pytest.raises(BundleError, match=r"head.npz is listed in the manifest but missing"):
        open_bundle(copy)


def _forge(folder, manifest: dict) -> None:
    """What an attacker who edits a bundle can do: fix every file's size and sha256 and the
    manifest's own digest (they are not secret), then write the manifest."""
    from edgetl.bundle import manifest_digest
    from edgetl.fileio import sha256_file

    for e in manifest["files"]:
        if (folder / e["file"]).is_file():
            e["bytes"], e["sha256"] = (folder / e["file"]).stat().st_size, sha256_file(folder / e["file"])
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_edited_manifest_is_refused_and_names_what_differs(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    # Reordered labels: every prediction would be silently wrong.
    (copy / "manifest.json").write_text(json.dumps({**m, "labels": m["labels"][::-1]}))
    with pytest.raises(BundleError, match=r"manifest.json was changed after export: its content hashes to "):
        open_bundle(copy)
    _forge(copy, {**m, "labels": m["labels"][::-1]})  # the digest recomputed too
    with pytest.raises(BundleError, match=r"the manifest's labels \['sunflowers', 'roses', 'daisy'\] differ from "
                                          r"labels.txt \['daisy', 'roses', 'sunflowers'\]"):
        open_bundle(copy)
    del m["manifest_sha256"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"carries no manifest_sha256"):
        open_bundle(copy)


@pytest.mark.parametrize("key,name", [("replay", "../outside.npz"), ("replay", "/tmp/outside.npz"),
                                      ("head", "labels.txt"), ("head", "nothing.npz")])
def test_file_names_in_the_manifest_must_be_its_verified_files(tiny_bundle, tmp_path, key, name):
    out, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in m["files"] if e["file"] == "backbone_int8.tflite")
    entry[key] = name
    _forge(copy, m)
    with pytest.raises(BundleError, match=rf"backbone_int8.tflite: {key} '{re.escape(name)}' is not one of the "
                                          rf"bundle's verified {key} files \("):
        open_bundle(copy)


def test_a_swapped_model_is_refused_when_opened_not_deep_in_a_computation(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    shutil.copy(copy / "classifier_fp32.tflite", copy / "backbone_fp32.tflite")  # 3 outputs, not 1280
    _forge(copy, json.loads((copy / "manifest.json").read_text()))
    b = open_bundle(copy)
    entry = next(e for e in b.files if e["file"] == "backbone_fp32.tflite")
    with pytest.raises(BundleError, match=r"backbone_fp32.tflite outputs 3 values per image; the manifest's "
                                          r"feature_dim is 1280: the file does not belong to this bundle"):
        b.open_model(entry)


def test_a_replay_file_with_a_pickle_is_a_clear_error(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    np.savez(copy / "replay_backbone_int8_tflite.npz", features=np.array([{"x": 1}], dtype=object),
             labels=np.zeros(1, np.int64))
    _forge(copy, json.loads((copy / "manifest.json").read_text()))
    b = open_bundle(copy)
    with pytest.raises(BundleError, match=r"replay file replay_backbone_int8_tflite.npz is not a features/labels npz"):
        b.replay(next(e for e in b.files if e["file"] == "backbone_int8.tflite"))


def test_zip_bombs_are_refused_before_extraction_and_zips_are_cleaned_up(tiny_bundle, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out, report = tiny_bundle
    b = open_bundle(report["zip"])  # a good zip: extracted to a private folder, removed on close
    extracted = b.root
    assert extracted.is_dir() and str(extracted).startswith(str(tmp_path / "tmp"))
    b.close()
    assert not extracted.exists() and not list((tmp_path / "tmp").iterdir())
    with open_bundle(report["zip"]) as b:  # and as a context manager
        assert b.labels == ["daisy", "roses", "sunflowers"]
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(out / "manifest.json", "manifest.json")
        zf.writestr("backbone_int8.tflite", b"\0" * (64 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match=r"zip member 'backbone_int8.tflite' unpacks \d+ bytes to 67108864 "
                                          r"\(more than 100x\): refused as a zip bomb"):
        open_bundle(bomb)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(300):
            zf.writestr(f"f{i}", b"x")
    with pytest.raises(BundleError, match=r"the zip has 300 members; a bundle has at most 256"):
        open_bundle(many)
    assert not list((tmp_path / "tmp").iterdir())  # nothing left behind by the refusals either


def test_zip_bundle_opens_and_verifies(tiny_bundle):
    out, report = tiny_bundle
    z = report["zip"]
    assert zipfile.is_zipfile(z)
    b = open_bundle(z)
    assert b.labels == ["daisy", "roses", "sunflowers"] and (b.root / "manifest.json").is_file()


def test_eval_and_predict_on_bundle_and_files(tiny_bundle, tiny_data, tmp_path):
    out, report = tiny_bundle
    runner = CliRunner()
    by_file = {v["file"]: v for v in report["files"]}
    for args, name in ((["--precision", "int8"], "classifier_int8.tflite"),
                       (["--backend", "onnxruntime", "--precision", "fp32"], "classifier_fp32.onnx")):
        res = runner.invoke(cli, ["eval", str(out), str(tiny_data["val"]), "--json", *args])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["accuracy"] == by_file[name]["accuracy"]
    # A bare ONNX file carries its labels and preprocessing in metadata_props.
    res = runner.invoke(cli, ["eval", str(out / "classifier_fp32.onnx"), str(tiny_data["val"]), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accuracy"] == by_file["classifier_fp32.onnx"]["accuracy"]
    # A bare TFLite file takes --labels.
    res = runner.invoke(cli, ["eval", str(out / "classifier_int8.tflite"), str(tiny_data["val"]),
                              "--labels", str(out / "labels.txt"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accuracy"] == by_file["classifier_int8.tflite"]["accuracy"]
    alone = tmp_path / "alone.tflite"
    shutil.copy(out / "classifier_int8.tflite", alone)  # no labels.txt beside it
    res = runner.invoke(cli, ["eval", str(alone), str(tiny_data["val"])])
    assert res.exit_code == 1 and "carries no labels; pass --labels FILE" in res.output


def test_uint8_io_export_is_checked_and_evaluates(tiny_run, tiny_data, tmp_path):
    from edgetl.convert.checks import tflite_summary
    from edgetl.export import export_run

    rep = export_run(tiny_run, tmp_path / "u8", targets=["tflite:int8"], io="uint8", calibration_images=24,
                     max_drop=100.0, replay_per_class=0, full_integer=True)
    for role in ("classifier", "backbone"):  # --full-int8: every tensor integer, I/O as asked
        entry = next(f for f in rep["manifest"]["files"] if f["role"] == role)
        assert entry["input"]["dtype"] == "uint8" and entry["output"]["dtype"] == "uint8"
        assert "quantization" not in entry
        assert tflite_summary(tmp_path / "u8" / entry["file"])["tensor_dtypes"].get("float32", 0) == 0
    assert rep["files"][0]["top1_agreement"] >= 0.75
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "u8"), str(tiny_data["val"]), "--json"])
    assert json.loads(res.stdout)["accuracy"] == rep["files"][0]["accuracy"]


def test_accuracy_gate_fails_with_both_numbers_and_writes_nothing(tiny_run, tmp_path):
    from edgetl.export import export_run

    target = tmp_path / "gated"
    # A gate no file can pass whatever its accuracy (it would have to beat Keras by more than 100
    # points), so the test does not depend on int8 being worse than float on 12 photos.
    with pytest.raises(ExportError) as err:
        export_run(tiny_run, target, targets=["tflite:int8"], roles=("classifier",), calibration_images=24,
                   max_drop=-100.5, replay_per_class=0)
    msg = str(err.value)
    assert "classifier_int8.tflite: int8 accuracy" in msg and "below the float Keras model's" in msg
    assert "tflite:fp16 or tflite:dynamic" in msg and "allowed: -100.5 points" in msg
    assert not target.exists()
    assert not list(tmp_path.glob(".gated.staging-*"))


def test_interrupted_export_leaves_no_bundle(tiny_run, tmp_path):
    target = tmp_path / "killed"
    cmd = [sys.executable, "-m", "edgetl.cli.main", "export", str(tiny_run), "--out", str(target),
           "-f", "tflite:all", "-f", "onnx:all", "--calibration-images", "8", "--max-drop", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.suffix == ".tflite" for s in tmp_path.glob(".killed.staging-*")
                                             for p in s.iterdir()):
        time.sleep(0.2)
    assert proc.poll() is None, "export finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert list(tmp_path.glob(".killed.staging-*"))  # the half-written work is hidden, not at the target
    # The next export cleans up the stale staging folder.
    from edgetl.export import export_run

    export_run(tiny_run, target, targets=["tflite:fp32"], roles=("classifier",), verify=False, replay_per_class=0)
    assert (target / "manifest.json").is_file()
    assert not list(tmp_path.glob(".killed.staging-*"))
    open_bundle(target)


def test_existing_bundle_needs_force(tiny_bundle, tiny_run):
    out, _ = tiny_bundle
    res = CliRunner().invoke(cli, ["export", str(tiny_run), "--out", str(out), "-f", "tflite:fp32"])
    assert res.exit_code == 1 and "already exists; pass --force to replace it" in res.output


def test_unknown_format_suggests_the_right_name(tiny_run):
    runner = CliRunner()
    res = runner.invoke(cli, ["export", str(tiny_run), "-f", "tflte"])
    assert res.exit_code == 2  # a value on the command line: a usage error, before anything is loaded
    assert "unknown format 'tflte'; did you mean 'tflite'?" in res.output
    res = runner.invoke(cli, ["export", str(tiny_run), "-f", "onnx:fp16"])
    assert res.exit_code == 2 and "format 'onnx' has no precision 'fp16'" in res.output


def test_coral_uint8_model_names_the_photos():
    res = CliRunner().invoke(cli, [
        "predict", str(CORAL / "mobilenet_v2_1.0_224_quant.tflite"), str(CORAL / "grace_hopper.bmp"),
        str(CORAL / "parrot.jpg"), str(CORAL / "cat.bmp"), "--labels", str(CORAL / "imagenet_labels.txt"), "--json"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)["predictions"]
    assert [p["label"] for p in preds] == ["military uniform", "macaw", "Egyptian cat"]
    m = open_model(CORAL / "mobilenet_v2_1.0_224_quant.tflite")
    assert m.input.dtype == "uint8" and m.input.zero_point == 128 and m.input.scale == pytest.approx(1 / 128)
    assert m.output.shape[-1] == 1001


def test_bench_refuses_a_head_only_format(tiny_run, tiny_data):
    res = CliRunner().invoke(cli, ["bench", str(tiny_run), str(tiny_data["val"]), "-f", "tflite-trainable"])
    assert res.exit_code == 1 and "tflite-trainable:fp32 is not one" in res.output


def test_bench_keeps_going_and_reports_every_row(tiny_bundle, tiny_data):
    out, _ = tiny_bundle
    res = CliRunner().invoke(cli, ["bench", str(out), str(tiny_data["val"]), "--runs", "3", "--warmup", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert {(r["format"], r["precision"]) for r in rows} == {
        (f.name, p) for f in FORMATS.values() if "classifier" in f.roles for p in f.precisions}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p50_ms_1t"] > 0 and r["p95_ms_1t"] >= r["p50_ms_1t"] and r["peak_rss_mb"] > 10
        assert 0 <= r["accuracy"] <= 1 and r["size_mb"] > 0.1


def test_wrong_model_file_is_named(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(cli, ["predict", str(bad), "x.jpg", "--labels", str(bad)])
    assert res.exit_code == 1
    assert "is neither a TFLite flatbuffer (no 'TFL3' identifier" in res.output


def test_bench_of_a_run_exports_each_row_and_compares_with_keras(tiny_run, tiny_data, tmp_path, monkeypatch):
    import tempfile

    from edgetl.bench import bench

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what bench writes there must be gone after
    result = bench(tiny_run, tiny_data["val"], targets=["tflite:fp32+int8", "onnx:fp32"], runs=2, warmup=0,
                   calibration_images=12, max_drop=100.0)
    assert not list(tmp_path.iterdir())
    rows = {(r["format"], r["precision"]): r for r in result["rows"]}
    assert list(rows) == [("keras", "fp32"), ("tflite", "fp32"), ("tflite", "int8"), ("onnx", "fp32")]
    assert rows[("keras", "fp32")]["accuracy"] == result["keras_accuracy"]
    for key in (("tflite", "fp32"), ("onnx", "fp32")):
        assert rows[key]["status"] == "ok" and rows[key]["agreement"] == 1.0 and rows[key]["diff_points"] == 0.0
    assert rows[("tflite", "int8")]["status"] == "ok" and rows[("tflite", "int8")]["agreement"] >= 0.75


def test_replay_takes_at_most_k_photos_of_every_class_even_when_classes_are_unbalanced():
    from pathlib import Path

    from edgetl.data import Sample
    from edgetl.export.exporter import first_per_class

    samples = [Sample(Path(f"a{i}.jpg"), 0, f"a/{i}.jpg") for i in range(3)]
    samples += [Sample(Path(f"b{i}.jpg"), 1, f"b/{i}.jpg") for i in range(10)]
    got = first_per_class(samples, 4)
    assert [s.relpath for s in got] == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "b/0.jpg", "b/1.jpg", "b/2.jpg", "b/3.jpg"]
    assert first_per_class(samples, 0) == []


def test_export_says_which_photos_verified_it_and_takes_unseen_ones(tiny_run, tiny_data, tmp_path):
    from edgetl.export import export_run

    common = dict(targets=["tflite:int8"], roles=("backbone",), max_drop=100.0, calibration_images=8,
                  replay_per_class=2)
    r = export_run(tiny_run, tmp_path / "default", **common)
    assert r["verified_on_photos"].startswith("the run's 12 validation photos (the head was refitted on them too")
    r = export_run(tiny_run, tmp_path / "unseen", val_dir=str(tiny_data["train"]), **common)
    assert r["verified_on_photos"] == f"24 photos of {tiny_data['train']} (--val)"
    assert r["files"][0]["num_images"] == 24


def test_a_run_whose_model_holds_a_lambda_layer_is_one_line_of_error(tiny_run, tiny_data, tmp_path):
    """A .keras file with a Lambda layer (Python code in the file) is never run: predict and export
    say so in one line, before anything is converted."""
    import keras

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("cache"))
    inputs = keras.Input((96, 96, 3))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs)).save(copy / "model.keras")
    photo = sorted(tiny_data["val"].rglob("*.jpg"))[0]
    for args in (["predict", str(copy), str(photo)], ["export", str(copy), "--out", str(tmp_path / "b"), "-f", "tflite:fp32"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1, (args, res.output)
        assert "holds a Lambda layer" in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) <= 2, res.output
    assert not (tmp_path / "b").exists()
