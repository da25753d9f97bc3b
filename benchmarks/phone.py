"""The phone app in a real browser (headless Chromium on this machine) against the Python device.

    python benchmarks/phone.py --bundle models/flowers_v3

Measures, side by side in one run:
1. labels: the page's (LiteRT.js, int8 backbone, the bundle's head) against Python LiteRT's on the
   bundle's reference photos and on 100 flowers/test photos;
2. ants + bees from 10 photos each (hymenoptera/train), learned in the page and by edgetl-device
   from a fresh store: hymenoptera/val accuracy, and flowers/test before and after;
3. one photo in the page (decode, preprocess, backbone, head; one thread, then the threaded build
   in a cross-origin isolated page) against Python LiteRT's backbone alone on one thread;
4. the page's retrain (20 new photos + the replay), first and second;
5. page weight (gzip) and cold load to the first prediction.
Prints a table and writes benchmarks/results/phone.json.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import http.server
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, cpu_line, table, write_json  # noqa: E402

FLOWERS, HYM = SHARED / "datasets" / "flowers", SHARED / "datasets" / "hymenoptera"


def photos(folder: Path, per_class: int | None = None) -> list[tuple[str, Path]]:
    out = []
    for c in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(c.glob("*.jpg"))
        out += [(c.name, f) for f in (files[:per_class] if per_class else files)]
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    isolated = False
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "text/javascript", ".webmanifest": "application/manifest+json"}

    def end_headers(self):
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, *args):
        pass


def serve(root: Path, isolated: bool) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("H", (_Handler,), {"isolated": isolated})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def browser(profile: Path):
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=390,844",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    d.set_script_timeout(1800)
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1,
                                                             "mobile": True})
    return d


def js(d, expr: str, *args):
    r = d.execute_async_script(
        "const done = arguments[arguments.length - 1], A = Array.from(arguments).slice(0, -1);"
        "const get = async (u) => { const r = await fetch(u); const b = await r.blob();"
        " return new File([b], u.split('/').pop(), {type: b.type}); };"
        f"Promise.resolve().then(async () => ({expr})).then(v => done({{ok: v}}), e => done({{error: String(e)}}));",
        *args)
    if "error" in r:
        raise RuntimeError(r["error"])
    return r["ok"]


def page_labels(d, urls: list[str], mode: str = "head") -> list[str]:
    return js(d, "(async () => { const out = []; for (const u of A[0]) out.push((await edgetl.predict(await get(u), "
                 "{mode: A[1]})).label); return out; })()", urls, mode)


def page_timing(d, urls: list[str], rounds: int = 3) -> float:
    """Median ms of edgetl.predict on a photo already in memory (decode, preprocess, backbone, head)."""
    return js(d, "(async () => { const blobs = []; for (const u of A[0]) blobs.push(await get(u));"
                 " for (const b of blobs.slice(0, 3)) await edgetl.predict(b);"
                 " const t = []; for (let r = 0; r < A[1]; r++) for (const b of blobs) {"
                 " const t0 = performance.now(); await edgetl.predict(b); t.push(performance.now() - t0); }"
                 " t.sort((a, b) => a - b); return t[t.length >> 1]; })()", urls, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--photos", type=int, default=20, help="flowers/test photos per class for the label check")
    p.add_argument("--shots", type=int, default=10, help="ants and bees photos taught")
    p.add_argument("--screenshot", type=Path, default=None, help="save the page (390x844) after teaching, as PNG")
    a = p.parse_args()

    from edgetl import preprocess
    from edgetl.bundle import open_bundle
    from edgetl.device import Learner
    from edgetl.device.phone import build_app, pick_backbone
    from edgetl.head.arrays import head_predict

    work = Path(tempfile.mkdtemp(prefix="edgetl-phone-bench-"))
    try:
        bundle = open_bundle(a.bundle)
        entry = pick_backbone(bundle)
        site = work / "site"
        site.mkdir()
        build_app(bundle, site / "app")
        (site / "photos").symlink_to(SHARED / "datasets")
        weight = {"app_gzip_bytes": 0, "model_gzip_bytes": 0, "app_bytes": 0, "model_bytes": 0}
        for f in (site / "app").rglob("*"):
            if f.is_file():
                kind = "model" if "model" in f.relative_to(site / "app").parts[:1] else "app"
                weight[f"{kind}_bytes"] += f.stat().st_size
                weight[f"{kind}_gzip_bytes"] += len(gzip.compress(f.read_bytes(), 6))
        rel = lambda p: "/photos/" + p.relative_to(SHARED / "datasets").as_posix()  # noqa: E731
        flowers = photos(FLOWERS / "test", a.photos)
        val = photos(HYM / "val")
        ants, bees = sorted((HYM / "train" / "ants").glob("*.jpg"))[: a.shots], \
            sorted((HYM / "train" / "bees").glob("*.jpg"))[: a.shots]

        # -- Python: labels of the same file with the bundle's head; the backbone alone, 1 thread ------
        runner = bundle.open_model(entry, threads=1)
        head = bundle.head(entry)
        spec = bundle.preprocessing

        def py_feature(path):
            return runner.run_prepared(runner.prepare(preprocess.load_pixels(path, spec.size)[0][None], spec))

        py_flowers = [bundle.labels[int(head_predict(py_feature(f), head).argmax())] for _, f in flowers]
        x1 = [runner.prepare(preprocess.load_pixels(f, spec.size)[0][None], spec) for _, f in flowers[:20]]
        for x in x1[:3]:
            runner.run_prepared(x)

        def py_ms() -> float:
            t = []
            for _ in range(3):
                for x in x1:
                    t0 = time.perf_counter()
                    runner.run_prepared(x)
                    t.append(1000 * (time.perf_counter() - t0))
            return statistics.median(t)

        # -- the page, one thread (not isolated) ---------------------------------------------------------
        srv, url = serve(site, isolated=False)
        d = browser(work / "profile1")
        try:
            t0 = time.perf_counter()
            d.get(url + "app/")
            js(d, "edgetl.ready")
            first = js(d, "(async () => (await edgetl.predict(await get(A[0]))).label)()", rel(flowers[0][1]))
            cold_s = time.perf_counter() - t0
            info = js(d, "edgetl.info()")
            page_flowers = page_labels(d, [rel(f) for _, f in flowers])
            ms_single, ms_python = [], []
            for _ in range(3):  # interleaved: the machine's speed drifts
                ms_single.append(page_timing(d, [rel(f) for _, f in flowers[:20]], rounds=1))
                ms_python.append(py_ms())
            before = page_labels(d, [rel(f) for _, f in flowers])
            js(d, "edgetl.add('ants', await Promise.all(A[0].map(get)))", [rel(f) for f in ants])
            js(d, "edgetl.add('bees', await Promise.all(A[0].map(get)))", [rel(f) for f in bees])
            train1 = js(d, "edgetl.train()")
            train2 = js(d, "edgetl.train()")
            page_val = page_labels(d, [rel(f) for _, f in val], "auto")
            page_after = page_labels(d, [rel(f) for _, f in flowers], "auto")
            if a.screenshot:
                d.refresh()
                js(d, "edgetl.ready")
                d.find_element("id", "predict-file").send_keys(str(val[-1][1]))
                time.sleep(2)
                d.save_screenshot(str(a.screenshot))
        finally:
            d.quit()
            srv.shutdown()
        # -- the page, threads (cross-origin isolated) -----------------------------------------------------
        srv, url = serve(site, isolated=True)
        d = browser(work / "profile2")
        try:
            d.get(url + "app/")
            js(d, "edgetl.ready")
            threaded = js(d, "edgetl.info()")["runtime"]["threads"]
            ms_threads = page_timing(d, [rel(f) for _, f in flowers[:20]])
        finally:
            d.quit()
            srv.shutdown()

        # -- edgetl-device: the same photos, a fresh store ----------------------------------------------------
        learner = Learner.open(a.bundle, store=work / "py.sqlite", backend="litert", precision=entry.get("precision"))
        try:
            learner.add(ants, "ants")
            learner.add(bees, "bees")
            t0 = time.perf_counter()
            learner.train()
            py_train_s = time.perf_counter() - t0
            py_val = [p["label"] for p in learner.predict([f for _, f in val], top_k=1)["predictions"]]
            py_after = [p["label"] for p in learner.predict([f for _, f in flowers], top_k=1)["predictions"]]
        finally:
            learner.close()

        acc = lambda got, truth: float(np.mean([g == t for g, (t, _) in zip(got, truth)]))  # noqa: E731
        same = float(np.mean([x == y for x, y in zip(page_flowers, py_flowers)]))
        single, python = statistics.median(ms_single), statistics.median(ms_python)
        out = {
            "cpu": cpu_line(), "bundle": str(a.bundle), "backbone_file": entry["file"],
            "self_test": info["self_test"], "labels_identical_references": info["self_test"]["agreement"],
            "labels_identical_flowers_test": same, "flowers_test_photos": len(flowers),
            "page": {"val": acc(page_val, val), "flowers_before": acc(before, flowers), "flowers_after": acc(page_after, flowers),
                     "train_first_s": train1["seconds"], "train_second_s": train2["seconds"],
                     "bias": train1.get("new_class_bias", {}).get("bias"), "activated": train1["activated"]},
            "python": {"val": acc(py_val, val), "flowers_before": acc(py_flowers, flowers),
                       "flowers_after": acc(py_after, flowers), "train_s": py_train_s},
            "ms_page_one_thread": single, "ms_page_threads": ms_threads, "threads_ran": threaded,
            "ms_python_backbone_one_thread": python, "ratio_page_to_python": single / python,
            "cold_load_to_first_prediction_s": cold_s, "first_label": first, **weight,
        }
        rows = [
            ["labels = Python LiteRT, references", f"{out['labels_identical_references']:.3f}", ">= 0.99 (identical)"],
            [f"labels = Python LiteRT, {len(flowers)} flowers/test", f"{same:.3f}", ">= 0.99"],
            ["ants+bees: hymenoptera/val, page / Python", f"{out['page']['val']:.3f} / {out['python']['val']:.3f}",
             "within 1 point"],
            ["flowers/test before -> after, page", f"{out['page']['flowers_before']:.3f} -> {out['page']['flowers_after']:.3f}", ""],
            ["flowers/test before -> after, Python", f"{out['python']['flowers_before']:.3f} -> {out['python']['flowers_after']:.3f}", ""],
            ["one photo in the page, 1 thread (ms)", f"{single:.1f}", ""],
            ["one photo in the page, threads (ms)", f"{ms_threads:.1f}", f"threads ran: {threaded}"],
            ["Python LiteRT backbone alone, 1 thread (ms)", f"{python:.2f}", ""],
            ["page / Python", f"{single / python:.1f}x", "<= 8x"],
            ["page retrain, first / second (s)", f"{train1['seconds']:.3f} / {train2['seconds']:.3f}", "<= 1 s"],
            ["Python retrain (s)", f"{py_train_s:.3f}", ""],
            ["page weight without the bundle, gzip (MB)", f"{weight['app_gzip_bytes'] / 1e6:.2f}",
             f"raw {weight['app_bytes'] / 1e6:.1f}"],
            ["the bundle's data, gzip (MB)", f"{weight['model_gzip_bytes'] / 1e6:.2f}", f"raw {weight['model_bytes'] / 1e6:.1f}"],
            ["cold load to first prediction (s)", f"{cold_s:.2f}", "localhost"],
        ]
        print(f"CPU: {out['cpu']}")
        print(table(["what", "measured", "floor / note"], rows))
        print(f"wrote {write_json('phone', out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
