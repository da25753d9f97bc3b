"""Shared by the benchmark scripts: paths to ../shared and JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGETL_SHARED", ROOT.parent / "shared")).resolve()
RESULTS = ROOT / "benchmarks" / "results"


def offline_keras_cache() -> None:
    """Point KERAS_HOME at a cache filled from shared/weights/keras unless one is set."""
    from edgetl.weights import use_offline_weights

    use_offline_weights(SHARED / "weights/keras")


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "cpu": cpu_line()}


def cpu_line() -> str:
    """The CPU a number came from: model and the int8 kernel flags (AVX2/VNNI/NEON dot product)."""
    from edgetl.bundle.selftest import cpu_fingerprint, describe_cpu

    fp = cpu_fingerprint()
    return f"{fp.get('model') or platform.processor() or platform.machine()}, {describe_cpu(fp)}"


class InferenceClock:
    """Batch-1 runs of a bundle's model file on one photo, 1 thread, sampled in between the
    runs they are compared with (a shared machine's speed drifts: a ratio is then measured side
    by side, not against a number taken minutes earlier)."""

    def __init__(self, bundle, entry: dict, photo: Path, warmup: int = 10):
        from edgetl import preprocess

        self.runner = bundle.open_model(entry, threads=1)
        self.x1 = self.runner.prepare(preprocess.load_pixels(photo, bundle.preprocessing.size)[0][None],
                                      bundle.preprocessing)
        self.times: list[float] = []
        for _ in range(warmup):
            self.runner.run_prepared(self.x1)

    def sample(self, runs: int = 20) -> None:
        import time

        for _ in range(runs):
            t0 = time.perf_counter()
            self.runner.run_prepared(self.x1)
            self.times.append(time.perf_counter() - t0)

    def seconds(self) -> float:
        """Median seconds of one run over every sample so far."""
        import numpy as np

        return float(np.median(self.times))


def inference_seconds(bundle, entry: dict, photo: Path, runs: int = 100, warmup: int = 10) -> float:
    """Median seconds of one batch-1 run of a bundle's model file on one photo, 1 thread."""
    clock = InferenceClock(bundle, entry, photo, warmup)
    clock.sample(runs)
    return clock.seconds()


def write_json(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **obj}, indent=2) + "\n")
    return path


def table(columns: list[str], rows: list[list]) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)])
