"""The command line through click's CliRunner, and the import-weight guarantees."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edgetl.cli import cli

from .conftest import TINY_ARGS


def _all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*prefix, name))


@pytest.mark.device
def test_every_command_has_help():
    runner = CliRunner()
    names = []
    for path, cmd in _all_commands(cli):
        res = runner.invoke(cli, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        assert (cmd.help or "").strip(), f"{' '.join(path)} has no help text"
        for opt in (p for p in cmd.params if isinstance(p, click.Option)):
            assert (opt.help or "").strip(), f"{' '.join(path)} {opt.opts[0]} has no help text"
        assert "Usage: " in res.output
        names.append(" ".join(path))
    assert {"train", "eval", "predict"} <= set(names)


@pytest.mark.device
def test_import_and_help_do_not_import_tensorflow():
    code = (
        "import sys, edgetl, edgetl.preprocess, edgetl.data, edgetl.predict, edgetl.runtime\n"
        "from click.testing import CliRunner\n"
        "from edgetl.cli import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_eval_predict_end_to_end(tiny_data, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    res = runner.invoke(cli, ["train", str(tiny_data["train"]), "--out", str(run_dir), "--val", str(tiny_data["val"]),
                              *TINY_ARGS, "--final-fit", "train", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["classes"] == ["daisy", "roses", "sunflowers"]
    assert (out["num_train"], out["num_val"], out["skipped"]) == (24, 12, [])
    assert out["run_dir"] == str(run_dir)
    assert 0.0 <= out["val_accuracy"] <= 1.0

    res = runner.invoke(cli, ["eval", str(run_dir), str(tiny_data["val"]), "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["accuracy"] == out["val_accuracy"] and ev["num_images"] == 12
    assert set(ev["per_class"]) == {"daisy", "roses", "sunflowers"}
    assert len(ev["confusion_matrix"]) == 3

    img = sorted((tiny_data["val"] / "roses").iterdir())[0]
    res = runner.invoke(cli, ["predict", str(run_dir), str(img), "--top-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    pred = json.loads(res.stdout)["predictions"]
    assert len(pred) == 1 and pred[0]["file"] == str(img)
    assert pred[0]["label"] == pred[0]["top"][0]["label"] and len(pred[0]["top"]) == 2
    assert pred[0]["top"][0]["score"] >= pred[0]["top"][1]["score"]

    res = runner.invoke(cli, ["eval", str(run_dir), str(tiny_data["val"])])
    assert res.exit_code == 0 and "precision" in res.stdout and "roses" in res.stdout


def test_cli_errors_are_one_clean_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert f"Directory '{tmp_path / 'missing'}' does not exist." in res.output
    res = runner.invoke(cli, ["train", str(tmp_path), "--backbone", "mobilenetv2"])
    assert res.exit_code == 2 and "'mobilenetv2' is not one of 'mobilenet_v2'" in res.output
    (tmp_path / "a").mkdir()
    res = runner.invoke(cli, ["train", str(tmp_path / "a"), "--out", str(tmp_path / "out"), *TINY_ARGS])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.device
def test_cli_rejects_bad_hidden_sizes(tmp_path):
    res = CliRunner().invoke(cli, ["train", str(tmp_path), "--hidden", "12,abc"])
    assert res.exit_code == 2
    assert "expected layer sizes such as '512' or '512,128'; received '12,abc'" in res.output


def test_demo_runs_the_whole_slice_and_can_run_again(tiny_data, tmp_path):
    args = ["demo", "--data", str(tiny_data["train"]), "--out", str(tmp_path / "demo"), "--per-class", "6",
            "--new-shots", "4", *TINY_ARGS]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [line[:3] for line in lines[:4]] == ["1/4", "2/4", "3/4", "4/4"]
    assert "'sunflowers' is kept for the device" in lines[0]
    assert "added 4 photos of 'sunflowers'" in lines[3]
    assert "before" in lines[5] and "after" in lines[5]
    assert "new class 'sunflowers' (4 photos)" in lines[6] and "the 2 old classes (4 photos)" in lines[7]
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert demo["num_new_test"] == 4 and demo["num_old_test"] == 4
    assert (tmp_path / "demo" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "device" / "store.sqlite").is_file()
    # The same command again replaces the demo's own output.
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    # A folder the demo did not write is refused, and left as it was.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    res = CliRunner().invoke(cli, ["demo", "--data", str(tiny_data["train"]), "--out", str(other)])
    assert res.exit_code == 1 and "was not written by 'edgetl demo'" in res.output
    assert (other / "notes.txt").read_text() == "keep"


def test_piping_into_head_ends_quietly_and_a_port_in_use_is_one_line(device_bundle, tmp_path):
    """`edgetl-device ... | head` whose reader is gone exits like a Unix tool (141, nothing on
    stderr); `serve` on a port that is taken says so in one line and exits 1."""
    import socket

    code = "from edgetl.cli.device_cmds import main; main()"
    base = [sys.executable, "-c", code, "--bundle", str(device_bundle), "--store", str(tmp_path / "s.sqlite")]
    assert subprocess.run([*base, "info"], capture_output=True, timeout=120).returncode == 0
    p = subprocess.Popen([*base, "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader went away before the first line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and b"Error" not in err and b"Traceback" not in err, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([*base, "serve", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (f"Error: port {port} on 127.0.0.1 is in use (another service, "
                                                        "or this one already running); stop it or pick another --port")
