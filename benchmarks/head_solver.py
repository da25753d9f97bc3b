"""The converged head solver (edgetl.head.fit.solve_softmax / choose_l2), measured.

    python benchmarks/head_solver.py --run runs/flowers --bundle models/flowers_v3

1. Workstation: the run's cached training features -> L2 by 5-fold CV (one-standard-error
   rule) -> L-BFGS; accuracy on flowers/test through the Keras float backbone's features
   (``benchmarks/results/cross_cpu/reference.npz``, made by ``cross_cpu.py reference``), with the
   run's own 80 % split and with all of flowers/train (train + validation photos).
2. Device: a retrain of the bundle's replay features + 10 ants + 10 bees (7 classes), the
   former Adam recipe against L-BFGS (both through train_head, in the full feature space),
   side by side with one batch-1 inference of the bundle's preferred backbone file (1 thread).
   Prints a table, writes benchmarks/results/head_solver.json.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, SHARED, inference_seconds, table, write_json  # noqa: E402


def run_features(run_dir: Path):
    """(features, labels) of the run's train and val photos, from its feature cache."""
    from edgetl.train.run import Run

    run = Run(run_dir)
    cache_path = Path(run.info["feature_cache"]["path"])
    if not cache_path.is_absolute():
        cache_path = Path.cwd() / cache_path
    with np.load(cache_path, allow_pickle=False) as z:
        cache = dict(zip(z["digests"].tolist(), z["features"]))
    out = {}
    for split in ("train", "val"):
        x, y = [], []
        for s in run.samples(split):
            d = hashlib.sha256(Path(s.path).read_bytes()).hexdigest()
            if d in cache:
                x.append(cache[d])
                y.append(s.label)
        out[split] = (np.array(x, np.float32), np.array(y, np.int64))
    return run, out


def workstation(run_dir: Path, ref_path: Path) -> list[dict]:
    from edgetl.head.solver import choose_l2, solve_softmax

    run, f = run_features(run_dir)
    ref = np.load(ref_path)
    xt, yt = ref["features"], ref["labels"]
    rows = []
    for name, (x, y) in (("train split (80 %)", f["train"]),
                         ("train + val (all of the folder)", tuple(np.concatenate(p) for p in zip(f["train"], f["val"])))):
        t0 = time.perf_counter()
        l2, cv = choose_l2(x, y, len(run.labels))
        t_cv = time.perf_counter() - t0
        layers, info = solve_softmax(x, y, len(run.labels), l2)
        w, b = layers[0]
        rows.append({"head": f"L-BFGS, CV L2, {name}", "photos": int(len(y)), "l2": l2,
                     "test_accuracy": float(((xt @ w + b).argmax(1) == yt).mean()), "cv_seconds": round(t_cv, 1),
                     "iterations": info["iterations"], "cv": cv})
    keras = float((ref["probs"].argmax(1) == yt).mean())
    rows.insert(0, {"head": "Keras head of the run (Adam, early stopping)", "photos": int(len(f["train"][1])),
                    "test_accuracy": keras})
    return rows


def device(bundle_dir: Path) -> dict:
    from edgetl import preprocess
    from edgetl.bundle import open_bundle
    from edgetl.head.fit import HeadTrainConfig, add_classes, train_head

    b = open_bundle(bundle_dir)
    e = b.pick("backbone")
    runner = b.open_model(e, threads=1)
    hym = SHARED / "datasets/hymenoptera/train"
    photos = sorted((hym / "ants").glob("*.jpg"))[:10] + sorted((hym / "bees").glob("*.jpg"))[:10]
    px = [preprocess.load_pixels(p, b.preprocessing.size)[0] for p in photos]
    t_inf = inference_seconds(b, e, photos[0])
    new = np.concatenate([runner.run_prepared(runner.prepare(p[None], b.preprocessing)) for p in px]).astype(np.float32)
    rx, ry = b.replay(e)
    c = len(b.labels)
    x, y = np.concatenate([rx, new]), np.concatenate([ry, [c] * 10 + [c + 1] * 10])
    start = add_classes(b.head(e), x, y, [c, c + 1])
    out = {"backbone_file": e["file"], "inference_ms": round(1000 * t_inf, 2), "samples": int(len(x)), "rows": []}
    # train_head itself, in the full feature space (the device's default solves in a subspace:
    # python benchmarks/device.py --only retrain).
    for name, cfg in (("adam, 300 steps (former default)", HeadTrainConfig(optimizer="adam")),
                      ("lbfgs, full space", HeadTrainConfig(optimizer="lbfgs"))):
        t0 = time.perf_counter()
        _, losses = train_head(start, x, y, cfg)
        dt = time.perf_counter() - t0
        out["rows"].append({"optimizer": name, "seconds": round(dt, 3), "final_loss": round(losses[-1], 5),
                            "x_inference": round(dt / t_inf, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/flowers"))
    ap.add_argument("--bundle", type=Path, default=Path("models/flowers_v3"))
    ap.add_argument("--reference", type=Path, default=RESULTS / "cross_cpu" / "reference.npz")
    a = ap.parse_args()
    ws = workstation(a.run, a.reference)
    print(table(["head", "photos", "L2", "flowers/test", "CV s"],
                [[r["head"], r["photos"], r.get("l2", ""), f"{r['test_accuracy']:.3f}", r.get("cv_seconds", "")]
                 for r in ws]))
    dv = device(a.bundle)
    print(f"\ndevice retrain: {dv['samples']} samples; one {dv['backbone_file']} inference {dv['inference_ms']} ms "
          f"(batch 1, 1 thread, {platform.processor() or platform.machine()})")
    print(table(["optimizer", "seconds", "final loss", "x one inference"],
                [[r["optimizer"], r["seconds"], r["final_loss"], r["x_inference"]] for r in dv["rows"]]))
    print(f"wrote {write_json('head_solver', {'workstation': ws, 'device': dv})}")


if __name__ == "__main__":
    main()
