"""The HTTP API of ``edgetl device serve`` (Starlette's test client over a real tiny bundle), and
the real server (uvicorn in a subprocess): token, SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from edgetl.device import HeadTrainConfig, Learner
from edgetl.device.service import Limits, check_binding, create_app
from edgetl.errors import ConfigError

from .helpers import HYMENOPTERA

pytestmark = pytest.mark.device
TestClient = pytest.importorskip("starlette.testclient").TestClient

ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
BEES = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))


def _files(paths, field="files"):
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _app(bundle, store, **kw):
    # Starlette's test client sends "Host: testserver"
    return create_app(lambda: Learner.open(bundle, store=store, threads=1), allowed_hosts=("testserver",), **kw)


def _wait(client, job_id, timeout=120.0):
    t0 = time.monotonic()
    seen = []
    while time.monotonic() - t0 < timeout:
        j = client.get(f"/api/jobs/{job_id}").json()
        seen.append(j["progress"])
        if j["state"] in ("done", "failed"):
            return j, seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {j['state']} after {timeout} s")


@pytest.fixture
def client(device_bundle, tmp_path):
    with TestClient(_app(device_bundle, tmp_path / "store.sqlite")) as c:
        yield c


def test_add_train_predict_rollback_through_the_api(client, device_bundle):
    info = client.get("/api/info").json()
    assert info["head_version"] == 1 and info["samples"] == {} and info["name"]
    assert info["backbone_file"].startswith("backbone") and info["versions"]["edgetl"]
    original = info["labels"]

    r = client.post("/api/samples", data={"label": "ants"}, files=_files(ANTS[:8]))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["stored"] == 8 and [f["file"] for f in body["files"]] == [p.name for p in ANTS[:8]]
    assert all(isinstance(f["id"], int) for f in body["files"]) and body["samples"] == {"ants": 8}
    assert client.post("/api/samples", data={"label": "bees"}, files=_files(BEES[:8])).status_code == 201
    again = client.post("/api/samples", data={"label": "bees"}, files=_files(BEES[:1]))
    assert again.status_code == 201 and again.json()["files"][0]["duplicate"] is True

    listing = client.get("/api/samples", params={"label": "ants"}).json()
    assert len(listing["samples"]) == 8 and listing["counts"] == {"ants": 8, "bees": 8}
    thumb = client.get(listing["samples"][0]["thumb"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 112

    r = client.post("/api/train")
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running", "done")
    job, progress = _wait(client, r.json()["id"])
    assert job["state"] == "done", job
    assert progress == sorted(progress) and job["progress"] == 1.0
    result = job["result"]
    assert result["version"] == 2 and result["labels"] == original + ["ants", "bees"]
    held = result["heldout"]  # every 4th of 8 stored photos per class: 2 ants + 2 bees
    assert held["available"] and held["samples"] == 4 and 0.0 <= held["accuracy"] <= 1.0

    pred = client.post("/api/predict", files=_files([ANTS[9]], "file"))
    assert pred.status_code == 200, pred.text
    p = pred.json()
    assert p["version"] == 2 and p["mode"] == "head" and p["label"] in result["labels"]
    assert len(p["top"]) == 3 and abs(p["top"][0]["score"] - p["score"]) < 1e-9 and p["ms"] > 0
    ncm = client.post("/api/predict", params={"mode": "ncm", "top": 2}, files=_files([BEES[9]], "file")).json()
    assert ncm["mode"] == "ncm" and len(ncm["top"]) == 2

    m = client.get("/api/metrics").json()
    assert m["available"] and m["version"] == 2 and m["samples"] == 4
    confusion = np.array(m["confusion"])
    assert confusion.shape == (len(m["labels"]),) * 2 and confusion.sum() == 4
    assert len(m["misclassified"]) == 4 - np.trace(confusion)
    stored_ids = {s["id"] for s in client.get("/api/samples").json()["samples"]}
    assert {w["id"] for w in m["misclassified"]} <= stored_ids

    h = client.get("/api/history").json()
    assert h["active"] == 2 and [v["version"] for v in h["versions"]] == [1, 2]
    assert client.post("/api/rollback", json={"version": 1}).json()["version"] == 1
    assert client.get("/api/info").json()["head_version"] == 1
    # The head asked for is the rolled-back one; 'auto' adds class means for ants (stored, not in it).
    assert client.post("/api/predict", params={"mode": "head"}, files=_files([ANTS[9]], "file")).json()["label"] in original
    auto = client.post("/api/predict", files=_files([ANTS[9]], "file")).json()
    assert auto["mode"] == "head+ncm" and "ants" in auto["mode_reason"]
    assert client.get("/api/metrics").json()["version"] == 1  # the bundle's head on every stored photo
    assert client.post("/api/rollback", json={"version": 2}).status_code == 200


def test_delete_and_rename(client):
    ids = client.post("/api/samples", data={"label": "ants"}, files=_files(ANTS[:3])).json()["files"]
    client.post("/api/samples", data={"label": "bees"}, files=_files(BEES[:3]))
    sid = ids[0]["id"]
    r = client.delete(f"/api/samples/{sid}")
    assert r.status_code == 200 and r.json()["samples"]["ants"] == 2
    assert client.delete(f"/api/samples/{sid}").status_code == 404
    assert client.get(f"/api/samples/{sid}/thumb").status_code == 404

    r = client.patch("/api/labels/ants", json={"name": "formica"})
    assert r.status_code == 200 and r.json()["samples"] == 2
    assert client.get("/api/info").json()["samples"] == {"formica": 2, "bees": 3}
    assert client.patch("/api/labels/formica", json={"name": "BEES"}).status_code == 400  # taken (case aside)
    assert client.patch("/api/labels/nope", json={"name": "x"}).status_code == 404

    job, _ = _wait(client, client.post("/api/train").json()["id"])
    assert job["state"] == "done" and "formica" in job["result"]["labels"]
    before = client.get("/api/info").json()["head_version"]
    r = client.patch("/api/labels/formica", json={"name": "ants"})  # a trained class: a new head version
    assert r.status_code == 200 and r.json()["version"] == before + 1
    assert "ants" in client.get("/api/info").json()["labels"]

    r = client.delete("/api/labels/bees")
    assert r.status_code == 200 and r.json()["samples_deleted"] == 3
    info = client.get("/api/info").json()
    assert "bees" not in info["labels"] and "bees" not in info["samples"]
    assert client.delete("/api/labels/bees").status_code == 404


def test_bad_requests_get_clear_json_errors(device_bundle, tmp_path):
    limits = Limits(max_file_bytes=200_000, max_files=3)
    big = tmp_path / "big.png"  # a real photo saved as a PNG over the per-file limit
    Image.open(ANTS[0]).resize((1000, 1000)).save(big)
    assert big.stat().st_size > limits.max_file_bytes
    with TestClient(_app(device_bundle, tmp_path / "s.sqlite", limits=limits)) as c:
        def err(r, status, *needles):
            assert r.status_code == status, r.text
            body = r.json()
            assert "Traceback" not in r.text
            text = body.get("error", "") + json.dumps(body.get("files", []))
            for n in needles:
                assert n in text, text
            return body

        err(c.post("/api/samples", files=_files(ANTS[:1])), 400, "label")
        err(c.post("/api/samples", data={"label": "ants"}), 400, "no photos")
        err(c.post("/api/samples", content=b"{}", headers={"content-type": "application/json"}), 400, "multipart")
        err(c.post("/api/samples", data={"label": "ants"}, files=_files(ANTS[:4])), 413, "3 photo")
        err(c.post("/api/samples", data={"label": "ants"}, files=[("files", ("big.png", big.read_bytes(), "image/png"))]),
            413, "big.png", "larger than the limit")
        broken = ("files", ("broken.jpg", ANTS[1].read_bytes()[:3000], "image/jpeg"))
        text = ("files", ("notes.txt", b"not a photo", "text/plain"))
        body = err(c.post("/api/samples", data={"label": "ants"}, files=[broken, text]), 400, "broken.jpg", "notes.txt")
        assert "edgetl-upload" not in json.dumps(body)  # the server's temporary paths stay on the server
        mixed = c.post("/api/samples", data={"label": "ants"}, files=[*_files(ANTS[2:4]), broken])
        assert mixed.status_code == 200 and mixed.json()["stored"] == 2
        assert [("id" in f, "error" in f) for f in mixed.json()["files"]] == [(True, False), (True, False), (False, True)]

        err(c.post("/api/predict", files=_files(ANTS[:2], "file")), 413)
        err(c.post("/api/predict", files=[("file", ("x.jpg", b"\xff\xd8 nope", "image/jpeg"))]), 400, "x.jpg")
        err(c.post("/api/predict", params={"mode": "knn"}, files=_files(ANTS[:1], "file")), 400, "mode")
        err(c.post("/api/rollback", json={"version": 99}), 404, "no head version 99")
        err(c.post("/api/rollback", json={"version": "1"}), 400, "whole number")
        err(c.post("/api/rollback", content=b"nope", headers={"Content-Type": "application/json"}), 400, "JSON")
        err(c.post("/api/rollback", content=b"nope"), 415, "application/json")
        err(c.get("/api/jobs/nope"), 404, "no job")
        err(c.get("/api/samples/abc/thumb"), 400, "whole number")
        err(c.get("/api/nothing"), 404, "no such page")
        err(c.delete("/api/train"), 405)
        assert c.get("/api/info").json()["samples"] == {"ants": 2}


def test_token_guards_the_api_not_the_page(device_bundle, tmp_path):
    with TestClient(_app(device_bundle, tmp_path / "s.sqlite", token="s3cret")) as c:
        r = c.get("/api/info")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "no token" in r.json()["error"]
        r = c.get("/api/info", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong token" in r.json()["error"]
        assert c.post("/api/samples", data={"label": "a"}, files=_files(ANTS[:1])).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text
        assert c.get("/static/app.js").status_code == 200
    with pytest.raises(ConfigError, match="needs a token"):
        check_binding("0.0.0.0", None)
    check_binding("127.0.0.1", None)


def test_one_training_at_a_time_and_shutdown_abandons_it(device_bundle, tmp_path):
    slow = HeadTrainConfig(optimizer="adam", epochs=1_000_000)  # runs until the service stops
    app = _app(device_bundle, tmp_path / "s.sqlite", train_config=slow, grace_s=0.2)
    with TestClient(app) as c:
        c.post("/api/samples", data={"label": "ants"}, files=_files(ANTS[:4]))
        first = c.post("/api/train").json()
        second = c.post("/api/train")
        assert second.status_code == 409 and first["id"] in second.json()["error"]
        deadline = time.monotonic() + 30
        while c.get(f"/api/jobs/{first['id']}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/api/info").json()["training"]["id"] == first["id"]
    job = app.state.service.jobs[first["id"]]
    assert job.state == "failed" and "abandoned" in job.error
    lr = Learner.open(device_bundle, store=tmp_path / "s.sqlite", readonly=True)
    try:  # nothing of the abandoned training was saved; the samples are kept
        assert [v["version"] for v in lr.history()] == [1] and lr.store.counts() == {"ants": 4}
    finally:
        lr.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(bundle, store, *args):
    code = "from edgetl.cli.device_cmds import main; main()"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EDGETL_TOKEN", None)
    return subprocess.Popen([sys.executable, "-c", code, "--bundle", str(bundle), "--store", str(store), "--threads",
                             "1", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until_up(proc, url, token, timeout=90.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            return _get(url, token)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError("serve did not answer")


def test_real_server_token_on_the_network_and_sigterm(device_bundle, tmp_path):
    store = tmp_path / "s.sqlite"
    port = _free_port()
    proc = _serve(device_bundle, store, "--host", "0.0.0.0", "--port", str(port))
    try:
        token = (tmp_path / "s.sqlite.token").read_text().strip() if _until_up(
            proc, f"http://127.0.0.1:{port}/api/info", None)[0] == 401 else None
        assert token, "a network address needs a token"
        assert (tmp_path / "s.sqlite.token").stat().st_mode & 0o077 == 0  # this user's only
        status, info = _get(f"http://127.0.0.1:{port}/api/info", token)
        assert status == 200 and info["head_version"] == 1
        assert _get(f"http://127.0.0.1:{port}/api/info", "nope")[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM (the status says how it stopped)
    assert proc.returncode in (0, -signal.SIGTERM) and "the sample store is closed" in out, out
    assert f"#token={token}" in out and "Traceback" not in out  # printed once, when new

    proc = _serve(device_bundle, store, "--host", "0.0.0.0", "--port", str(port))
    try:
        assert _until_up(proc, f"http://127.0.0.1:{port}/api/info", token)[0] == 200  # the same token
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "the sample store is closed" in out and token not in out and "kept in" in out
