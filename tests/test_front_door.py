"""What a new user meets first: README and --help agree, argument errors before TensorFlow, no
TensorFlow noise, failed commands leave nothing, weights for offline machines, predict/eval on
folders and with plots, the device CLI's conveniences."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgetl.cli import cli
from edgetl.cli.reference import cli_reference, readme_section

from .conftest import TINY_ARGS
from .helpers import FLOWERS, HYMENOPTERA, ROOT, SHARED

README = (ROOT / "README.md").read_text(encoding="utf-8")
ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
BEES = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))


# -- README and --help ------------------------------------------------------------------------
@pytest.mark.device
def test_readme_command_reference_is_what_help_says():
    section = readme_section(README)
    assert section is not None, "README.md lost its command reference markers"
    assert section == cli_reference(), "README.md's command reference is stale: python -m edgetl.cli.reference --write"


def _option_defaults(command: click.Command) -> dict[str, object]:
    return {p.name: p.default for p in command.params
            if isinstance(p, click.Option) and not p.is_flag and p.default is not None}


@pytest.mark.parametrize("path, config", [
    (("train",), "edgetl.train.config:TrainConfig"),
    (("export",), "edgetl.export.config:ExportConfig"),
])
def test_cli_defaults_are_the_config_dataclasses(path, config):
    """Every option named like a field of the command's config has that field's default."""
    import dataclasses
    import importlib

    module, _, name = config.partition(":")
    cls = getattr(importlib.import_module(module), name)
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    command = cli
    for part in path:
        command = command.commands[part]
    shared = {k: v for k, v in _option_defaults(command).items() if k in fields}
    assert len(shared) >= 5, f"{' '.join(path)} shares too few options with {name}: {sorted(shared)}"
    for key, value in shared.items():
        want = fields[key]
        assert (tuple(value) if isinstance(value, (list, tuple)) else value) == want, \
            f"edgetl {' '.join(path)} --{key.replace('_', '-')} defaults to {value!r}; {name}.{key} is {want!r}"


def _readme_invocations() -> list[list[str]]:
    """Every `edgetl ...` command line in README's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            for part in re.split(r"&&|;", line.split(" #")[0]):
                part = part.strip()
                if part.startswith("edgetl "):
                    out.append(shlex.split(part.replace("[", " ").replace("]", " ").replace("|", " ")))
    return out


@pytest.mark.device
def test_every_readme_command_line_uses_real_commands_and_options():
    lines = _readme_invocations()
    assert len(lines) >= 20
    for words in lines:
        cmd: click.Command = cli
        names: set[str] = set()
        for w in words[1:]:
            if isinstance(cmd, click.Group) and w in cmd.commands:
                names |= {o for p in cmd.params for o in p.opts}  # a group's options work after its commands
                cmd = cmd.commands[w]
                continue
            if w.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", w):
                opt = w.split("=")[0]
                known = names | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
                assert opt in known, f"README: '{' '.join(words)}': {cmd.name} has no option {opt}"
        assert cmd is not cli, f"README: '{' '.join(words)}' names no command"


# -- argument errors and noise ----------------------------------------------------------------
@pytest.mark.device
def test_argument_errors_are_answered_before_tensorflow_is_imported(tmp_path):
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom edgetl.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['train', {str(tmp_path)!r}, '--alpha', '0.6'])\n"
        "print(r.exit_code, r.output.strip())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "1 Error: alpha for 'mobilenet_v2' must be one of [0.35, 0.5, 0.75, 1.0, 1.3, 1.4]; received 0.6"
    assert out[1] == "[]"
    assert not list(tmp_path.iterdir())


def test_tensorflow_start_up_noise_is_held_back(tiny_run, tiny_data):
    cmd = [sys.executable, "-m", "edgetl.cli.main", "eval", str(tiny_run), str(tiny_data["val"])]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout
    for noise in ("cudart_stub", "cuInit", "oneDNN", "absl::InitializeLog", "port.cc"):
        assert noise not in out.stderr, out.stderr


# -- train: nothing left behind, --force ---------------------------------------------------------
def test_train_refuses_an_existing_run_and_force_swaps_it_whole(tiny_data, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    args = ["train", str(tiny_data["train"]), "--out", str(run_dir), "--val", str(tiny_data["val"]), *TINY_ARGS,
            "--solver", "adam", "--epochs", "2", "--json"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["run_dir"] == str(run_dir) and first["feature_cache"]["path"].startswith(str(run_dir))
    assert first["head_training"]["epochs_run"] == 2 and first["head_training"]["epochs"] == 2

    r = runner.invoke(cli, args)
    assert r.exit_code == 1 and "already holds a run; pass --force" in r.output

    r = runner.invoke(cli, [*args, "--force"])
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout)
    assert second["feature_cache"]["computed"] == 0  # the old run's cache was reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or old folders left
    assert json.loads((run_dir / "run.json").read_text())["classes"] == first["classes"]

    # Not a run: refused even with --force, nothing touched.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    r = runner.invoke(cli, ["train", str(tiny_data["train"]), "--out", str(other), "--force", *TINY_ARGS])
    assert r.exit_code == 1 and "is not an edgetl run folder" in r.output
    assert (other / "mine.txt").read_text() == "keep me"


def test_a_failed_train_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
    (data / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    (data / "b" / "bad.jpg").write_bytes(b"not a jpeg either")
    out = tmp_path / "runs" / "r"
    r = CliRunner().invoke(cli, ["train", str(data), "--out", str(out), *TINY_ARGS, "--val-split", "0.5"])
    assert r.exit_code == 1 and "no usable" in r.output
    assert not out.exists()
    assert not list((tmp_path / "runs").iterdir())


# -- weights for offline machines -----------------------------------------------------------------
@pytest.mark.device
def test_weights_add_fills_the_keras_cache_and_can_be_repeated(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    runner = CliRunner()
    r = runner.invoke(cli, ["weights", "add", str(SHARED / "weights" / "keras"), "--json"])
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    assert {f["status"] for f in files} == {"added"} and len(files) == 2
    r = runner.invoke(cli, ["weights", "add", str(SHARED / "weights" / "keras")])
    assert r.exit_code == 0 and r.output.count("already there") == 2
    r = runner.invoke(cli, ["weights", "list"])
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in r.output
    r = runner.invoke(cli, ["weights", "add", str(ANTS[0])])
    assert r.exit_code == 1 and "is not an HDF5 (.h5) file" in r.output


# -- predict and eval on folders ----------------------------------------------------------------------
@pytest.mark.device
def test_predict_takes_folders_and_globs_and_prints_top_k(device_bundle, tmp_path):
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    for p in ANTS[:2] + BEES[:1]:
        (folder / p.name).write_bytes(p.read_bytes())
    runner = CliRunner()
    r = runner.invoke(cli, ["predict", str(device_bundle), str(tmp_path / "photos"), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["predictions"]) == 3
    r = runner.invoke(cli, ["predict", str(device_bundle), str(tmp_path / "photos" / "**" / "*.jpg"), "--top-k", "3"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(line.count(",") == 1 and "[" in line for line in lines)  # 2 more labels each
    r = runner.invoke(cli, ["predict", str(device_bundle), str(tmp_path / "nothing" / "*.jpg")])
    assert r.exit_code == 1 and "matches no image files" in r.output


def test_eval_plots_writes_confusion_mistakes_and_a_contact_sheet(device_bundle, tmp_path):
    data = tmp_path / "val"
    for c in ("daisy", "roses", "sunflowers"):
        (data / c).mkdir(parents=True)
        for p in sorted((FLOWERS / "test" / c).glob("*.jpg"))[:5]:
            (data / c / p.name).write_bytes(p.read_bytes())
    r = CliRunner().invoke(cli, ["eval", str(device_bundle), str(data), "--plots", str(tmp_path / "plots"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (tmp_path / "plots" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "plots" / "misclassified.csv").read_text().splitlines()
    assert rows[0] == "file,true,predicted,score" and len(rows) - 1 == len(rep["misclassified"])
    assert len(rep["misclassified"]) == round((1 - rep["accuracy"]) * rep["num_images"])
    if rep["misclassified"]:
        from PIL import Image

        with Image.open(tmp_path / "plots" / "mistakes.jpg") as im:
            assert im.format == "JPEG" and im.width >= 128


# -- the device CLI ---------------------------------------------------------------------------------------
@pytest.mark.device
def test_device_options_work_after_the_command_and_dash_h_works(device_bundle, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["device", "info", "--bundle", str(device_bundle), "--store", str(tmp_path / "s.sqlite"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["head_version"] == 1
    r = runner.invoke(cli, ["device", "-h"])
    assert r.exit_code == 0 and "--bundle" in r.output
    exe = Path(sys.executable).with_name("edgetl-device")
    if exe.exists():
        out = subprocess.run([str(exe), "-h"], capture_output=True, text=True)
        assert out.returncode == 0 and "Keep learning on the device" in out.stdout


@pytest.mark.device
def test_device_refuses_a_label_differing_only_in_case(device_bundle, tmp_path):
    runner = CliRunner()
    base = ["device", "--bundle", str(device_bundle), "--store", str(tmp_path / "s.sqlite"), "--threads", "1"]
    r = runner.invoke(cli, [*base, "add", "--label", "Roses", str(ANTS[0])])
    assert r.exit_code == 1 and "differs from the existing class 'roses' only in case" in r.output
    r = runner.invoke(cli, [*base, "add", "--label", "Roses", "--new-class", str(ANTS[0]), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["stored"] == 1


@pytest.mark.device
def test_device_eval_and_export_round_trip(device_bundle, tmp_path):
    runner = CliRunner()
    base = ["device", "--bundle", str(device_bundle), "--store", str(tmp_path / "s.sqlite"), "--threads", "1"]
    r = runner.invoke(cli, [*base, "add", "--label", "ants", *map(str, ANTS[:8]), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, [*base, "train", "--json"])
    assert r.exit_code == 0, r.output
    labels = json.loads(r.stdout)["labels"]
    val = tmp_path / "val"
    (val / "ants").mkdir(parents=True)
    (val / "roses").mkdir()
    for p in ANTS[8:14]:
        (val / "ants" / p.name).write_bytes(p.read_bytes())
    for p in sorted((FLOWERS / "test" / "roses").glob("*.jpg"))[:6]:
        (val / "roses" / p.name).write_bytes(p.read_bytes())
    r = runner.invoke(cli, [*base, "eval", str(val), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["new_classes"]["num_images"] == 6 and ev["original_classes"]["num_images"] == 6
    assert ev["accuracy"] == pytest.approx((ev["new_classes"]["accuracy"] + ev["original_classes"]["accuracy"]) / 2)
    r = runner.invoke(cli, [*base, "eval", str(val)])
    assert "new classes: accuracy" in r.output and "original classes: accuracy" in r.output
    # A version measured while another is active (after a rollback): nothing is activated.
    trained = json.loads(runner.invoke(cli, [*base, "eval", str(val), "--mode", "head", "--json"]).stdout)
    assert runner.invoke(cli, [*base, "rollback", "1"]).exit_code == 0
    r = runner.invoke(cli, [*base, "eval", str(val), "--mode", "head", "--version", str(trained["head_version"]),
                            "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["accuracy"] == trained["accuracy"] and again["head_version"] == trained["head_version"]
    r = runner.invoke(cli, [*base, "eval", str(val), "--version", "99"])
    assert r.exit_code == 1 and "no head version 99" in r.output
    assert runner.invoke(cli, [*base, "rollback", str(trained["head_version"])]).exit_code == 0

    out = tmp_path / "mine"
    r = runner.invoke(cli, [*base, "export", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    ex = json.loads(r.stdout)
    assert ex["labels"] == labels and ex["stored"] == 8
    # The exported bundle answers like the device does, through the workstation's predict and a new
    # device: the same labels and (the calibration travels) the same scores.
    r = runner.invoke(cli, [*base, "predict", *map(str, ANTS[8:14]), "--mode", "head", "--json"])
    device_preds = [(p["label"], p["score"]) for p in json.loads(r.stdout)["predictions"]]
    r = runner.invoke(cli, ["predict", str(out), *map(str, ANTS[8:14]), "--json"])
    assert r.exit_code == 0, r.output
    exported = [(p["label"], p["score"]) for p in json.loads(r.stdout)["predictions"]]
    assert [p[0] for p in exported] == [p[0] for p in device_preds]
    assert max(abs(a[1] - b[1]) for a, b in zip(exported, device_preds)) < 1e-4, (exported, device_preds)
    # It carries the self-test references: a new device checks it on its CPU.
    r = runner.invoke(cli, ["device", "--bundle", str(out), "--store", str(tmp_path / "chk.sqlite"), "check", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"], r.output
    r = runner.invoke(cli, ["device", "--bundle", str(out), "--store", str(tmp_path / "new.sqlite"), "info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["labels"] == labels and info["replay_features"] > 8
    r = runner.invoke(cli, [*base, "export", "--out", str(out)])
    assert r.exit_code == 1 and "already exists; pass --force" in r.output
