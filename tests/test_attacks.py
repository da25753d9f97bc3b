"""What other web pages and hostile files get from the device: nothing. The service's Host,
Origin and content-type rules (in-process and in a real headless Chromium: a page of another
origin, and a rebinding-style Host), photos that are not photos, and bundles whose entries
lead out of the bundle."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading

import pytest
from starlette.testclient import TestClient

from edgetl.bundle import MANIFEST, open_bundle
from edgetl.device.service.guard import HostPolicy, split_host
from edgetl.errors import BundleError, DataError
from edgetl.preprocess import decode_image

from .helpers import HYMENOPTERA
from .test_service import _app, _free_port, _get, _serve, _until_up

ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))


@pytest.mark.device
def test_the_host_policy():
    assert split_host("[::1]:8080") == ("::1", "8080") and split_host("Pi.local:80") == ("pi.local", "80")
    local = HostPolicy("127.0.0.1")
    assert local.allows("127.0.0.1") and local.allows("localhost") and not local.allows("attacker.example")
    assert not local.allows("192.168.1.20")
    lan = HostPolicy("0.0.0.0", ("mypi.example",))
    assert lan.allows("192.168.1.20") and lan.allows("mypi.example") and not lan.allows("attacker.example")


@pytest.mark.device
def test_other_pages_and_rebinding_hosts_change_nothing(device_bundle, tmp_path):
    with TestClient(_app(device_bundle, tmp_path / "s.sqlite")) as c:
        before = c.get("/api/history").json()
        r = c.get("/api/info", headers={"Host": "attacker.example"})
        assert r.status_code == 421 and "attacker.example" in r.json()["error"] and "--allowed-host" in r.json()["error"]
        files = [("files", (ANTS[0].name, ANTS[0].read_bytes(), "image/jpeg"))]
        r = c.post("/api/samples", data={"label": "ants"}, files=files, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "evil.example" in r.json()["error"]
        r = c.post("/api/rollback", content=b'{"version": 1}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
        r = c.post("/api/rollback", json={"version": 1}, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        r = c.delete("/api/labels/daisy", headers={"Origin": "null"})
        assert r.status_code == 403
        r = c.post("/api/sync", content=b"{}", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415
        assert c.get("/api/history").json() == before and c.get("/api/info").json()["samples"] == {}
        # The page's own requests (same origin) still work.
        r = c.post("/api/samples", data={"label": "ants"}, files=files, headers={"Origin": "http://testserver",
                                                                                 "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 201, r.text


@pytest.mark.device
def test_a_postscript_file_named_jpg_never_reaches_a_decoder(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(DataError, match="holiday.jpg: a PostScript file, not a photo; expected a JPEG, PNG"):
        decode_image(eps, "holiday.jpg", 224)


@pytest.mark.device
def test_a_bundle_entry_that_links_out_of_the_bundle_is_refused_unread(device_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(device_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    head = next(e["file"] for e in manifest["files"] if e["file"] == "head.npz")
    outside = tmp_path / "secret.npz"
    shutil.copy2(bundle / head, outside)  # the same bytes: the hash would pass
    (bundle / head).unlink()
    os.symlink(outside, bundle / head)
    with pytest.raises(BundleError, match="head.npz is a symbolic link") as err:
        open_bundle(bundle)
    assert "sha256" not in str(err.value) and "bytes" not in str(err.value)


def _attacker_site(root, page: str):
    (root / "index.html").write_text(page)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_in_chromium_a_page_of_another_origin_and_a_rebound_host_get_nothing(device_bundle, tmp_path):
    from selenium import webdriver

    from .test_web import _chromium

    found = _chromium()
    if found is None:
        pytest.skip("no Chromium here: install Debian's 'chromium' and 'chromium-driver' (.ci/run does)")
    port = _free_port()
    proc = _serve(device_bundle, tmp_path / "s.sqlite", "--port", str(port))
    target = f"http://127.0.0.1:{port}"
    site = tmp_path / "evil"
    site.mkdir()
    # What a page on another site can send without asking (no preflight): a form post, a
    # text/plain "JSON" body.
    srv = _attacker_site(site, f"""<script>
      const fd = new FormData(); fd.append("label", "owned");
      fd.append("files", new Blob([new Uint8Array([255, 216, 255])], {{type: "image/jpeg"}}), "x.jpg");
      Promise.allSettled([
        fetch("{target}/api/samples", {{method: "POST", body: fd, mode: "no-cors"}}),
        fetch("{target}/api/rollback", {{method: "POST", body: '{{"version": 1}}', mode: "no-cors",
                                          headers: {{"Content-Type": "text/plain"}}}}),
        fetch("{target}/api/train", {{method: "POST", mode: "no-cors"}}),
      ]).then(() => document.title = "sent");
    </script>""")
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--host-resolver-rules=MAP attacker.example 127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        _until_up(proc, target + "/api/info", None)
        before = _get(target + "/api/history")[1]
        d.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        d.set_script_timeout(30)
        d.execute_async_script("const done = arguments[0]; const t = setInterval(() => {"
                               " if (document.title === 'sent') { clearInterval(t); done(); } }, 100);")
        assert _get(target + "/api/history")[1] == before
        assert _get(target + "/api/info")[1]["samples"] == {} and not _get(target + "/api/info")[1]["training"]
        # DNS rebinding: attacker.example now resolves to the device; its page reads "its own" origin.
        d.get(f"http://attacker.example:{port}/api/info")
        body = d.find_element("tag name", "body").text
        assert "is not this service's name" in body and "bundle" not in body
    finally:
        d.quit()
        srv.shutdown()
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.mark.device
def test_bodies_are_bounded_while_they_stream_and_odd_numbers_are_400s(device_bundle, tmp_path):
    with TestClient(_app(device_bundle, tmp_path / "s.sqlite")) as c:
        r = c.post("/api/rollback", content=b"[" * 200_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "at most 65536" in r.json()["error"]

        def chunks():  # no Content-Length: the limit holds as the bytes arrive
            for _ in range(100):
                yield b" " * 4096

        r = c.post("/api/rollback", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "passed 65536 bytes" in r.json()["error"]
        r = c.post("/api/rollback", content=b"[" * 60_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = c.get("/api/samples/" + "9" * 40 + "/thumb")
        assert r.status_code == 400 and "out of range" in r.json()["error"]


@pytest.mark.device
@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace('"labels": [', '"labels": ["x"], "labels": [', 1), "appear twice"),
    (lambda text: text.replace('"feature_dim": ', '"feature_dim": NaN, "x": ', 1), "NaN is not a number"),
    (lambda text: text.replace('"files": [', '"files": {"a": [', 1).replace('"tools"', '"x": 1}, "tools"', 1),
     "not valid JSON|files must be a list"),
    (lambda text: '{"a": ' * 100_000 + "1" + "}" * 100_000, "not valid JSON"),
])
def test_a_hostile_manifest_is_one_line_of_error(device_bundle, tmp_path, edit, message):
    bundle = tmp_path / "b"
    shutil.copytree(device_bundle, bundle)
    (bundle / MANIFEST).write_text(edit((bundle / MANIFEST).read_text()))
    with pytest.raises(BundleError, match=message):
        open_bundle(bundle)


@pytest.mark.device
def test_an_oversized_photo_is_cut_while_it_streams_and_refused_alone(device_bundle, tmp_path, monkeypatch):
    """A file over the per-file limit is not spooled whole (at most the limit + 1 byte is kept) and
    gets its own 413; the good photo beside it is stored."""
    from starlette.formparsers import MultiPartParser

    from edgetl.device.service import Limits

    kept = []
    real = MultiPartParser.on_part_data

    def spy(self, data, start, end):
        if self._current_part.file is not None:
            kept.append(end - start)
        return real(self, data, start, end)

    monkeypatch.setattr(MultiPartParser, "on_part_data", spy)
    limits = Limits(max_file_bytes=200_000, max_files=16)  # the request may carry 3.2 MB; one photo 200 KB
    with TestClient(_app(device_bundle, tmp_path / "s.sqlite", limits=limits)) as c:
        big = ("files", ("big.jpg", b"\xff\xd8" + b"\x00" * 2_000_000, "image/jpeg"))
        good = ("files", (ANTS[0].name, ANTS[0].read_bytes(), "image/jpeg"))
        r = c.post("/api/samples", data={"label": "ants"}, files=[big, good])
    assert r.status_code == 200, r.text
    files = r.json()["files"]
    assert "larger than the limit of 200000 bytes" in files[0]["error"] and "id" in files[1]
    assert sum(kept) <= 200_001 + ANTS[0].stat().st_size


@pytest.mark.device
def test_a_damaged_store_is_refused_before_it_is_used(device_bundle, tmp_path):
    from edgetl.device import Learner
    from edgetl.errors import StoreError

    store = tmp_path / "s.sqlite"
    learner = Learner.open(device_bundle, store=store, threads=1)
    learner.add(ANTS[:6], "ants")
    learner.close()
    data = bytearray(store.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page : 2 * page + 512] = b"\xa5" * 512  # damage a page in the middle (not the header)
    store.write_bytes(bytes(data))
    for readonly in (False, True):
        with pytest.raises(StoreError, match="is damaged"):
            Learner.open(device_bundle, store=store, threads=1, readonly=readonly)


@pytest.mark.device
def test_a_request_has_a_decode_budget_counted_from_the_headers(device_bundle, tmp_path):
    """Huge images of a few KB each cannot hold the learner: the photos past the request's decode
    budget (pixels read from their headers, a JPEG at its reduced scale) are refused with 413
    before any decoding; the ones within it are stored."""
    import io

    from PIL import Image

    from edgetl.device.service import Limits
    from edgetl.preprocess import decoded_pixels

    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000), (20, 120, 30)).save(buf, "PNG")
    huge = buf.getvalue()
    assert len(huge) < 200_000 and decoded_pixels(huge) == 25_000_000
    assert decoded_pixels(b"not an image") == 0
    limits = Limits(max_request_pixels=30_000_000)
    with TestClient(_app(device_bundle, tmp_path / "s.sqlite", limits=limits)) as c:
        files = [("files", (ANTS[0].name, ANTS[0].read_bytes(), "image/jpeg"))] + [
            ("files", (f"huge-{i}.png", huge, "image/png")) for i in range(3)]
        r = c.post("/api/samples", data={"label": "ants"}, files=files)
        assert r.status_code == 200, r.text
        got = r.json()["files"]
        assert "id" in got[0] and "id" in got[1], got
        for f in got[2:]:
            assert "25.0 MP to decode, past this request's budget of 30 MP" in f["error"], f
        alone = c.post("/api/samples", data={"label": "ants"}, files=files[2:3])  # a new request, a new budget
        assert alone.status_code == 201 and alone.json()["files"][0].get("duplicate"), alone.text
