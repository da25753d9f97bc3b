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
