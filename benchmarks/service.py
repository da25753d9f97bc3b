"""One prediction through ``edgetl device serve`` against the CLI and the backbone's own time.

    python benchmarks/service.py --bundle models/flowers_mixed [--photos 20] [--threads 1]

Side by side in one run, on one CPU, all at ``--threads``:

* backbone: one batch-1 run of the bundle's preferred backbone file on a prepared input;
* in-process: ``Learner.predict`` of one photo (read, decode, resize, backbone, head);
* API: ``POST /api/predict`` of one photo to the real server (uvicorn in a subprocess, on a
  kept-alive HTTP connection, as the page's live loop uses it);
* CLI: ``edgetl-device predict PHOTO --json``, a new process per photo (Python start,
  imports, bundle verification, model load, predict).

Prints a table, writes benchmarks/results/service.json. Medians over the photos.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, table, write_json  # noqa: E402


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--photos", type=int, default=20)
    ap.add_argument("--cli-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=8799)
    args = ap.parse_args()

    from edgetl.bundle.selftest import cpu_fingerprint, describe_cpu
    from edgetl.device import Learner
    from edgetl.preprocess import load_pixels

    photos = sorted((SHARED / "datasets/flowers/test").glob("*/*.jpg"))[:: 7][: args.photos]
    tmp = Path(tempfile.mkdtemp(prefix="edgetl-bench-service-"))
    store = tmp / "store.sqlite"
    learner = Learner.open(args.bundle, store=store, threads=args.threads)  # a writer: caches the self-test
    spec = learner.spec
    x = learner.runner.prepare(load_pixels(photos[0], spec.size)[0][None], spec)
    for _ in range(5):
        learner.runner.run_prepared(x)
    backbone = []
    for _ in range(len(photos)):
        t0 = time.perf_counter()
        learner.runner.run_prepared(x)
        backbone.append(time.perf_counter() - t0)
    in_process = []
    for p in photos:
        t0 = time.perf_counter()
        learner.predict([p], top_k=3)
        in_process.append(time.perf_counter() - t0)
    backbone_file = learner.backbone_entry["file"]
    learner.close()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-c", "from edgetl.cli.device_cmds import main; main()",
                               "--bundle", str(args.bundle), "--store", str(store), "--threads", str(args.threads),
                               "serve", "--port", str(args.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env, text=True)
    api, server_ms = [], []
    try:
        t0 = time.monotonic()
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
                conn.request("GET", "/api/info")
                conn.getresponse().read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() - t0 > 120:
                    out = server.stdout.read() if server.poll() is not None else ""
                    raise SystemExit(f"the server did not start: {out}") from None
                time.sleep(0.2)
        bodies = [multipart(p) for p in photos]
        for body, ctype in bodies[:3]:  # warm-up
            conn.request("POST", "/api/predict", body=body, headers={"Content-Type": ctype})
            conn.getresponse().read()
        for body, ctype in bodies:
            t0 = time.perf_counter()
            conn.request("POST", "/api/predict", body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            doc = json.loads(r.read())
            api.append(time.perf_counter() - t0)
            assert r.status == 200, doc
            server_ms.append(doc["ms"] / 1000)
        conn.close()
    finally:
        server.terminate()
        server.communicate(timeout=60)

    cli = []
    for p in photos[: args.cli_runs]:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "from edgetl.cli.device_cmds import main; main()",
                              "--bundle", str(args.bundle), "--store", str(store), "--threads", str(args.threads),
                              "predict", str(p), "--json"], capture_output=True, text=True, env=env)
        cli.append(time.perf_counter() - t0)
        assert out.returncode == 0, out.stderr[-2000:]

    med = {k: statistics.median(v) for k, v in (("backbone", backbone), ("in_process", in_process), ("api", api),
                                                  ("api_server_side", server_ms), ("cli", cli))}
    b = med["backbone"]
    rows = [
        ["backbone alone (batch 1, prepared input)", f"{b * 1000:.1f}", "1.0"],
        ["Learner.predict in process (1 photo)", f"{med['in_process'] * 1000:.1f}", f"{med['in_process'] / b:.1f}"],
        ["POST /api/predict, measured by the server", f"{med['api_server_side'] * 1000:.1f}",
         f"{med['api_server_side'] / b:.1f}"],
        ["POST /api/predict, round trip (keep-alive)", f"{med['api'] * 1000:.1f}", f"{med['api'] / b:.1f}"],
        ["edgetl-device predict (new process)", f"{med['cli'] * 1000:.0f}", f"{med['cli'] / b:.0f}"],
    ]
    cpu = cpu_fingerprint()
    print(f"{backbone_file} of {args.bundle}, {args.threads} thread(s), {describe_cpu(cpu)} {cpu.get('model', '')}")
    print(table(["one prediction", "median ms", "x backbone"], rows))
    path = write_json("service", {
        "bundle": str(args.bundle), "backbone_file": backbone_file, "threads": args.threads, "cpu": cpu,
        "photos": len(photos), "cli_runs": len(cli), "median_seconds": med,
        "api_over_backbone": med["api"] / b, "cli_over_api": med["cli"] / med["api"]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
