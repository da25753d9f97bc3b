"""device_scripts/: the inbox loop end to end, and the installer's refusal of 32-bit ARM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from edgetl.device import Learner

from .helpers import HYMENOPTERA, ROOT

pytestmark = pytest.mark.device
SCRIPTS = ROOT / "device_scripts"


def test_personalize_inbox_round_trip(device_bundle, tmp_path):
    inbox = tmp_path / "inbox"
    ants = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
    bees = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))
    for label, files in (("ants", ants[:4]), ("bees", bees[:4]), ("unlabelled", [ants[10], bees[10]])):
        (inbox / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, inbox / label / f.name)
    (inbox / "unlabelled" / "broken.jpg").write_bytes(b"not a photo")
    (inbox / "ants" / "cut.jpg").write_bytes(ants[5].read_bytes()[:3000])  # added in the same call as good ones
    store = tmp_path / "store.sqlite"
    cmd = [sys.executable, str(SCRIPTS / "personalize.py"), "--bundle", str(device_bundle), "--inbox", str(inbox),
           "--store", str(store), "--once", "--retrain-every", "5", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # Everything left the inbox: learned/classified to .done, the broken photo to .rejected.
    assert sorted(p.name for p in (inbox / "ants").iterdir()) == []
    assert sorted(p.name for p in (inbox / ".done" / "ants").iterdir()) == sorted(f.name for f in ants[:4])
    assert (inbox / ".rejected" / "unlabelled" / "broken.jpg").is_file()
    assert (inbox / ".rejected" / "ants" / "cut.jpg").is_file()
    rej = [json.loads(line) for line in (inbox / ".rejected" / "rejected.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rej] == ["ants/cut.jpg", "unlabelled/broken.jpg"]
    assert "cannot decode image" in rej[0]["reason"] and "not a recognised image" in rej[1]["reason"]
    preds = [json.loads(line) for line in (inbox / "predictions.jsonl").read_text().splitlines()]
    assert [p["file"] for p in preds] == [str(inbox / "unlabelled" / ants[10].name), str(inbox / "unlabelled" / bees[10].name)]
    assert all({"label", "score", "top", "head_version"} <= set(p) for p in preds)
    # 8 samples stored; retrained after 5 and once more at the end for the last 3.
    learner = Learner.open(device_bundle, store=store)
    assert learner.store.counts() == {"ants": 4, "bees": 4}
    assert learner.store.active_version() == 3 and learner.labels()[-2:] == ["ants", "bees"]
    learner.close()
    # A second pass finds nothing to do.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (inbox / "predictions.jsonl").read_text().count("\n") == 2


def test_install_pi_refuses_32bit_arm(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "uname").write_text("#!/bin/sh\necho armv7l\n")
    (fake / "uname").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(SCRIPTS / "install_pi.sh"), "--prefix", str(tmp_path / "opt")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "32-bit ARM system (armv7l)" in out.stderr and "Raspberry Pi OS (64-bit)" in out.stderr
    assert not (tmp_path / "opt").exists()


def test_serve_unit_command_runs_the_service(device_bundle, tmp_path):
    """edgetl-serve.service's ExecStart, as systemd runs it (sh -c with /etc/default/edgetl's
    variables), serves the API; SIGTERM stops it cleanly."""
    import re
    import signal

    from .test_service import _free_port, _until_up

    unit = (SCRIPTS / "edgetl-serve.service").read_text()
    command = re.search(r"^ExecStart=/bin/sh -c '(.+)'$", unit, re.M).group(1)
    port = _free_port()
    env = {**os.environ, "EDGETL_VENV": str(ROOT / "x"), "EDGETL_BUNDLE": str(device_bundle),
           "EDGETL_STORE": str(tmp_path / "store.sqlite"), "EDGETL_TOKEN": "unit-token",
           "EDGETL_SERVE_ARGS": f"--host 0.0.0.0 --port {port} --threads 1"}
    venv = tmp_path / "venv" / "bin"  # $EDGETL_VENV/bin/edgetl-device: this environment's script
    venv.mkdir(parents=True)
    (venv / "edgetl-device").write_text(f"#!/bin/sh\nexec {sys.executable} -c "
                                        "'from edgetl.cli.device_cmds import main; main()' \"$@\"\n")
    (venv / "edgetl-device").chmod(0o755)
    env["EDGETL_VENV"] = str(tmp_path / "venv")
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        status, info = _until_up(proc, f"http://127.0.0.1:{port}/api/info", "unit-token")
        assert status == 200 and info["store"] == str(tmp_path / "store.sqlite")
    finally:
        proc.send_signal(signal.SIGTERM)  # 'exec' in ExecStart: the signal reaches the service itself
        out, _ = proc.communicate(timeout=60)
    assert "the sample store is closed" in out, out
