"""``edgetl bench``: one row per format x precision: status, size, accuracy, latency, memory.

Latency and peak memory are measured in a fresh subprocess per file and thread count
(``python -m edgetl.bench.benchmark FILE``), so one file's memory never counts against another's and
the worker imports no TensorFlow. One failing format never stops the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import EdgetlError

log = logging.getLogger("edgetl")
Progress = Callable[[str, int, int], None]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` from /proc, because Linux carries ``ru_maxrss`` across exec: a worker started
    from a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def measure_file(path: str | Path, threads: int, runs: int = 30, warmup: int = 3, seed: int = 0) -> dict:
    """Batch-1 latency (p50/p95 ms) of a model file, in this process."""
    from ..runtime import open_model

    runner = open_model(path, threads=threads)
    size = runner.input_size or 224
    x = np.random.default_rng(seed).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    for _ in range(warmup):
        runner.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "threads": threads,
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "peak_rss_mb": peak_rss_mb(),
        "runtime": runner.backend,
    }


def measure_in_subprocess(path: str | Path, threads: int, runs: int, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "edgetl.bench.benchmark", str(path), "--threads", str(threads),
           "--runs", str(runs), "--warmup", str(warmup)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise EdgetlError(f"latency measurement of {Path(path).name} failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _predictions(predictor, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([predictor.predict(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def _row_for_file(path: Path, predictor, data, keras_acc, keras_pred, runs, warmup, threads_all, max_drop) -> dict:
    row: dict = {"file": path.name, "size_mb": round(path.stat().st_size / 1e6, 3)}
    x, y = data
    pred = _predictions(predictor, x)
    row["accuracy"] = float((pred == y).mean())
    row["num_images"] = int(len(y))
    if keras_pred is not None:
        row["agreement"] = float((pred == keras_pred).mean())
    if keras_acc is not None:
        row["diff_points"] = round(100 * (row["accuracy"] - keras_acc), 3)
    for threads in sorted({1, threads_all}):
        m = measure_in_subprocess(path, threads, runs, warmup)
        key = "1t" if threads == 1 else "all"
        row[f"p50_ms_{key}"] = round(m["p50_ms"], 3)
        row[f"p95_ms_{key}"] = round(m["p95_ms"], 3)
        row["peak_rss_mb"] = max(row.get("peak_rss_mb", 0), round(m["peak_rss_mb"], 1))
        row["runtime"] = m["runtime"]
    failed = keras_acc is not None and -row["diff_points"] > max_drop
    row["status"] = "failed verification" if failed else "ok"
    if failed:  # the row says why: what it scored against what the gate allows
        row["error"] = (f"accuracy {100 * row['accuracy']:.2f}% is {-row['diff_points']:.2f} points below Keras's "
                        f"{100 * keras_acc:.2f}% on these {row['num_images']} photos; --max-drop allows {max_drop:g}")
    return row


def bench(
    source: str | Path,
    data_dir: str | Path,
    targets: list[str] | None = None,
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    calibration_images: int = 200,
    max_drop: float = 1.0,
    io: str = "int8",
    progress: Progress | None = None,
    full_integer: bool = False,
) -> dict:
    """Benchmark a run folder (exports every target first) or an existing bundle."""
    source = Path(source)
    threads_all = threads or (os.cpu_count() or 1)
    is_run = (source / "run.json").is_file()
    with contextlib.ExitStack() as cleanup:  # the exported rows' folder, an extracted zip: removed at the end
        return _bench(source, data_dir, targets, runs, warmup, threads_all, calibration_images, max_drop, io,
                      progress, full_integer, is_run, cleanup)


def _bench(source, data_dir, targets, runs, warmup, threads_all, calibration_images, max_drop, io, progress,
           full_integer, is_run, cleanup) -> dict:
    from ..data import load_samples, scan_folder
    from ..formats import FORMATS, parse_targets
    from ..predict import FilePredictor, open_predictor
    from ..runtime import open_model

    rows: list[dict] = []
    keras_acc = None
    keras_pred = None
    reference = open_predictor(source)
    # Decode the evaluation photos once; every row is scored on the same arrays.
    folder = scan_folder(data_dir, classes=reference.labels)
    x, y, bad = load_samples(folder.samples, reference.preprocessing)
    for _, reason in bad:
        log.warning("skipping %s", reason)
    data = (x, y)
    if is_run:
        keras_pred = _predictions(reference, data[0])
        keras_acc = float((keras_pred == data[1]).mean())
        rows.append({"format": "keras", "precision": "fp32", "status": "ok", "accuracy": keras_acc,
                     "num_images": int(len(data[1])), "diff_points": 0.0, "agreement": 1.0})
        wanted = parse_targets(targets or [f"{n}:all" for n, f in FORMATS.items() if "classifier" in f.roles])
        heads_only = [f"{f.name}:{p}" for f, p in wanted if "classifier" not in f.roles]
        if heads_only:
            raise EdgetlError(f"bench measures image classifiers; {', '.join(heads_only)} is not one "
                              "(its training steps are timed by benchmarks/device.py)")
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="edgetl-bench-")))
        items = []
        for fmt, precision in wanted:
            items.append((fmt.name, precision, work / f"{fmt.name}_{precision}"))
    else:
        from ..bundle import open_bundle

        b = open_bundle(source)
        cleanup.callback(b.close)
        items = [(e["format"], e["precision"], b.path(e)) for e in b.entries("classifier")]
        if not items:
            raise EdgetlError(f"bundle {source} has no classifier files to benchmark")
    for i, (fmt_name, precision, where) in enumerate(items):
        row = {"format": fmt_name, "precision": precision}
        try:
            if is_run:
                from ..export import export_run

                export_run(source, where, targets=[f"{fmt_name}:{precision}"], roles=("classifier",), io=io,
                           full_integer=full_integer, calibration_images=calibration_images, verify=False,
                           replay_per_class=0)
                from ..bundle import open_bundle

                b = open_bundle(where)
                path = b.path(b.pick("classifier"))
            else:
                path = where
            labels, spec = b.labels, b.preprocessing
        except EdgetlError as exc:
            row.update({"status": "export failed", "error": str(exc)[:300]})
            rows.append(row)
            log.warning("%s %s: export failed: %s", fmt_name, precision, exc)
            continue
        except Exception as exc:  # a converter crash must not stop the table
            row.update({"status": "export failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            rows.append(row)
            continue
        try:
            predictor = FilePredictor(open_model(path, threads=threads_all), labels, spec, str(path))
            if labels != reference.labels or spec != reference.preprocessing:
                raise EdgetlError(f"{path} has other labels or preprocessing than {source}")
            row.update(_row_for_file(Path(path), predictor, data, keras_acc, keras_pred, runs, warmup, threads_all,
                                     max_drop))
        except Exception as exc:
            row.update({"status": "failed verification", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        rows.append(row)
        if progress:
            progress("bench", i + 1, len(items))
    return {"source": str(source), "data_dir": str(data_dir), "threads_all": threads_all, "runs": runs,
            "keras_accuracy": keras_acc, "rows": rows}


def _main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="measure one model file's batch-1 latency (internal)")
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(measure_file(a.path, a.threads, a.runs, a.warmup)))


if __name__ == "__main__":
    _main()
