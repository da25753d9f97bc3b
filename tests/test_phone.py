"""The phone as a device: the static app from a bundle, its learner under node --test against the
Python learner, and the whole page in a real headless Chromium (phone screen, fake camera) served
by ``edgetl device serve``: self-test, teach, train, predict, reload, roll back, sync with the
Pi's store, then offline through the service worker.

``EDGETL_SCREENSHOT_PHONE=docs/phone.png`` also saves the page as the test leaves it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from edgetl import preprocess
from edgetl.device.phone import VENDOR_FILES, build_app, vendor_dir

from .helpers import HYMENOPTERA, ROOT
from .phone_fixtures import write_learner_fixture, write_resize_fixture
from .test_service import _free_port, _get, _serve, _until_up

ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
BEES = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))
PHONE = (390, 844)


def _need_vendor():
    if not all((vendor_dir() / f).is_file() for f in VENDOR_FILES):
        pytest.skip("LiteRT.js is not in edgetl/device/phone/app/vendor: run 'cd js && npm ci && node vendor.mjs' "
                    "(.ci/run does)")


@pytest.mark.device
def test_the_app_holds_the_bundle_and_a_static_batch_backbone(device_bundle, tmp_path):
    from edgetl.bundle import open_bundle
    from edgetl.runtime import TFLiteRunner

    _need_vendor()
    r = build_app(device_bundle, tmp_path / "app")
    app = Path(r["app"])
    meta = json.loads((app / "model" / "meta.json").read_text())
    listing = json.loads((app / "files.json").read_text())
    assert meta["backbone_file"] == r["backbone_file"] and meta["self_test"]["photos"] > 0
    assert {"index.html", "sw.js", "edgetl.js", "learner.js", "model/backbone.tflite"} <= set(listing["files"])
    # Only the batch dimension changed: the same features as the bundle's file.
    b = open_bundle(device_bundle)
    entry = b.pick("backbone", backend="litert", precision=meta["precision"])
    fixed = TFLiteRunner(app / "model" / "backbone.tflite", threads=1)
    assert list(fixed.input.shape)[0] == 1
    original = TFLiteRunner(b.path(entry), threads=1)
    x = np.random.default_rng(0).uniform(-1, 1, (1, *original.input.shape[1:])).astype(np.float32)
    assert np.array_equal(fixed.run(x), original.run(x))
    with pytest.raises(Exception, match="already exists"):
        build_app(device_bundle, app)


@pytest.mark.device
def test_the_page_learner_matches_the_python_learner(device_bundle, tmp_path):
    """node --test (js/test/) on fixtures the Python learner writes: Pillow's resize pixel for pixel,
    and a retrain's labels, bias, temperature and probabilities (within 1e-3)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (apt-get install nodejs)")
    write_resize_fixture(tmp_path)
    write_learner_fixture(device_bundle, tmp_path, k=6)
    out = subprocess.run([node, "--test", str(ROOT / "js" / "test")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EDGETL_JS_FIXTURES": str(tmp_path)})
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout and "# skipped 0" in out.stdout


@pytest.fixture()
def chromium(tmp_path):
    from .test_web import _chromium, write_y4m

    found = _chromium()
    if found is None:
        pytest.skip("no Chromium here: install Debian's 'chromium' and 'chromium-driver' (.ci/run does)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    video = write_y4m(BEES[20], tmp_path / "bee.y4m")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={PHONE[0]},{PHONE[1]}", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={video}",
                f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=found[1]))
    driver.set_script_timeout(120)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": PHONE[0], "height": PHONE[1],
                                                                  "deviceScaleFactor": 1, "mobile": True})
    try:
        yield driver
    finally:
        driver.quit()


def _js(d, expr: str, *args):
    """Await ``expr`` in the page (``A``: the arguments); an error there fails the test with its message."""
    r = d.execute_async_script(
        "const done = arguments[arguments.length - 1], A = Array.from(arguments).slice(0, -1);"
        f"Promise.resolve().then(async () => ({expr})).then(v => done({{ok: v}}), e => done({{error: String(e)}}));",
        *args)
    assert "error" not in r, r["error"]
    return r["ok"]


def _wait(d, cond, timeout=120.0, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.2).until(cond, message=f"waiting for {what}")
    except Exception:
        print("page text:", d.find_element("tag name", "body").text[:2000])
        for e in d.get_log("browser")[-20:]:
            print(e)
        raise


def _requested(d) -> set[str]:
    urls = set()
    for e in d.get_log("performance"):
        m = json.loads(e["message"])["message"]
        if m.get("method") == "Network.requestWillBeSent":
            urls.add(m["params"]["request"]["url"])
    return urls


def _ready(d, timeout=180.0):
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") in ("1", "error"),
          timeout, "the app to load")
    assert d.find_element("tag name", "body").get_attribute("data-ready") == "1", d.find_element("id", "fatal").text


def _add(d, label: str, photos: list[Path]) -> None:
    box = d.find_element("id", "label")
    box.clear()
    box.send_keys(label)
    d.find_element("id", "add-files").send_keys("\n".join(str(p) for p in photos))
    _wait(d, lambda d: f"stored as {label}" in d.find_element("id", "add-result").text, what=f"{label} stored")


def test_the_phone_learns_offline_and_syncs_with_the_pi(device_bundle, chromium, tmp_path):
    from edgetl.device import Learner

    _need_vendor()
    d = chromium
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    store = tmp_path / "pi.sqlite"
    proc = _serve(device_bundle, store, "--port", str(port))
    try:
        _until_up(proc, origin + "/api/info", None)
        d.get(origin + "/phone/")
        _ready(d)
        info = _js(d, "edgetl.info()")
        st = info["self_test"]
        assert st["ok"] and st["pixels_identical"] and st["cosine_mean"] >= st["expected"]["min_cosine_mean"], st
        assert info["runtime"]["threads"] is True  # the service isolates the page: the threaded build runs

        # Teach two new classes from files (10 photos each), as a user does.
        _add(d, "ants", ANTS[:10])
        _add(d, "bees", BEES[:10])
        assert _js(d, "edgetl.info()")["samples"] == {"ants": 10, "bees": 10}
        d.find_element("id", "train").click()
        _wait(d, lambda d: d.find_element("id", "train-result").text.startswith("v2"), what="training")
        trained = _js(d, "edgetl.history()")[-1]
        assert trained["active"] and trained["labels"][-2:] == ["ants", "bees"], trained

        # A photo no one trained on, through the file picker; then the camera (a bee photo).
        d.find_element("id", "predict-file").send_keys(str(BEES[15]))
        _wait(d, lambda d: "v2" in d.find_element("id", "prediction-meta").text, what="a prediction")
        d.find_element("id", "camera-start").click()
        _wait(d, lambda d: d.find_element("id", "prediction-label").text not in ("—", ""), what="a camera prediction")

        # The same photos' features in the page and in Python LiteRT (the same int8 file): bit for bit,
        # decoded at full resolution (the Pi's JPEG decoder scales photos of twice the input size
        # and more down in the DCT, which a browser cannot: there the features differ a little).
        page_feats = np.array([np.frombuffer(base64.b64decode(s["feature"]), "<f4")
                               for s in _js(d, "edgetl.export()")["samples"]])
        learner = Learner.open(device_bundle, store=tmp_path / "check.sqlite", threads=1)
        try:
            assert info["backbone_file"] == learner.backbone_entry["file"]
            size = learner.spec.size
            full = np.stack([preprocess.resize_rgb(preprocess.decode_image(p.read_bytes(), p.name), size)
                             for p in ANTS[:10] + BEES[:10]])
            py_feats = np.concatenate([learner.runner.run_prepared(learner.runner.prepare(full[i : i + 1], learner.spec))
                                       for i in range(len(full))])
        finally:
            learner.close()
        assert np.array_equal(page_feats, py_feats)

        # Reload: samples and head are still there; roll back and forth.
        d.refresh()
        _ready(d)
        again = _js(d, "edgetl.info()")
        assert again["samples"] == {"ants": 10, "bees": 10} and again["head_version"] == 2
        assert _js(d, "edgetl.rollback(1)")["version"] == 1
        assert _js(d, "edgetl.info()")["head_version"] == 1
        _js(d, "edgetl.rollback(2)")

        # Page and Pi: the page's features go to the Pi's store (and its head comes back as v3).
        page_probs = _js(d, "Promise.all(A[0].map(async f => (await edgetl.predict(Float32Array.from(f), "
                            "{mode: 'head', top: 10})).top))", page_feats[[0, 10]].tolist())
        synced = _js(d, "edgetl.sync()")
        assert synced["sent"]["stored"] == 20 and _get(origin + "/api/info")[1]["samples"] == {"ants": 10, "bees": 10}
        # The Pi's head (its bundle's: no ants, no bees) is kept as v3 but not made active.
        assert synced["version"] == 3 and not synced["activated"] and _js(d, "edgetl.info()")["head_version"] == 2

        # Offline: the service worker serves the whole app; the page still loads and predicts.
        _wait(d, lambda d: d.execute_script("return !!navigator.serviceWorker.controller"), what="the service worker")
        cached = _js(d, "(async () => { const k = (await caches.keys()).find(k => k.startsWith('edgetl-'));"
                        " return (await (await caches.open(k)).keys()).length })()")
        assert cached >= 20
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    d.refresh()
    _ready(d)
    d.find_element("id", "predict-file").send_keys(str(ANTS[15]))
    _wait(d, lambda d: "v2" in d.find_element("id", "prediction-meta").text, what="an offline prediction")

    # Nothing came from outside the page's own origin.
    foreign = {u for u in _requested(d) if urlparse(u).scheme in ("http", "https")
               and f"{urlparse(u).scheme}://{urlparse(u).netloc}" != origin}
    assert not foreign, foreign

    # The Pi's store, trained by the Python learner on the page's features: the page's head.
    pi = Learner.open(device_bundle, store=store, threads=1)
    try:
        pi.train()
        labels, probs = pi.scores(page_feats[[0, 10]].astype(np.float32), "head")
    finally:
        pi.close()
    for row, top in zip(probs, page_probs):
        page = {t["label"]: t["score"] for t in top}
        assert max(abs(page[lab] - float(p)) for lab, p in zip(labels, row)) <= 1e-3, (page, dict(zip(labels, row)))
    shot = os.environ.get("EDGETL_SCREENSHOT_PHONE")
    if shot:
        d.save_screenshot(shot)
