"""On-device benchmark: quality of personalization, and speed and memory with 1 thread.

Quality (LiteRT, int8 backbone): add 10 ants and 10 bees from hymenoptera/train as new
classes, retrain with the defaults, then score the new classes on hymenoptera/val (7-way)
and the flower classes on flowers/test, before and after.

Speed and memory, LiteRT and ONNX Runtime side by side, each in a fresh process, 1 thread:
backbone p50/p95 per image, ``add`` per image (decode to durable commit; calls of 1 and of 10
photos, interleaved with backbone runs, ratios taken round by round),
retraining on 500 stored samples for 20 epochs, cold start (new process to first prediction),
peak RSS (VmHWM).

    python benchmarks/device.py --run runs/flowers          # exports the bundle first (TensorFlow)
    python benchmarks/device.py --bundle models/flowers     # device side only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, SHARED, InferenceClock, cpu_line, table, write_json  # noqa: E402
from edgetl.formats import FORMATS, LITERT  # noqa: E402

HYM = SHARED / "datasets/hymenoptera"
FLOWERS = SHARED / "datasets/flowers"
BACKENDS = {f.runtime: f.name for f in FORMATS.values() if "backbone" in f.roles}  # runtime -> format


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")


def quality(bundle: Path, per_class: int) -> dict:
    from edgetl.device import Learner

    store = Path(tempfile.mkdtemp()) / "q.sqlite"
    learner = Learner.open(bundle, store=store, backend=LITERT, precision="int8")
    flower_labels = learner.labels()
    test = [(p, c) for c in flower_labels for p in photos(FLOWERS / "test" / c)]
    val = [(p, c) for c in ("ants", "bees") for p in photos(HYM / "val" / c)]

    def acc(items, mode="head"):
        preds = learner.predict([p for p, _ in items], mode=mode)["predictions"]
        return float(np.mean([pr.get("label") == c for pr, (_, c) in zip(preds, items)]))

    before = acc(test)
    learner.add(photos(HYM / "train" / "ants")[:per_class], "ants")
    learner.add(photos(HYM / "train" / "bees")[:per_class], "bees")
    r = learner.train()
    out = {"flowers_test_before": before, "flowers_test_after": acc(test), "new_classes_val": acc(val),
           "ncm_new_classes_val": acc(val, "ncm"), "ncm_flowers_test": acc(test, "ncm"),
           "train_seconds": r["seconds"], "samples": r["num_samples"], "per_class": per_class}
    out["flowers_drop_points"] = round(100 * (before - out["flowers_test_after"]), 2)
    # The phone's path: the same samples, trained through the bundle's trainable TFLite head.
    learner.rollback(1)
    learner.close()
    learner = Learner.open(bundle, store=store, backend=LITERT, precision="int8", trainer="tflite")
    learner.train()
    out["tflite_trainer_flowers_test_after"] = acc(test)
    out["tflite_trainer_new_classes_val"] = acc(val)
    learner.close()
    return out


def retrain(bundle: Path, per_class: int, repeats: int = 7) -> dict:
    """The default retrain after adding ants and bees (``per_class`` photos each), against one
    backbone inference (LiteRT int8, batch 1, 1 thread), in one process: the first training
    (measures the bundle's reference on held-back replay, kept in the store), then ``repeats``
    more from the bundle's head (rollback 1, train), medians. With the solver's report and the
    largest gradient component of the full-feature-space problem at the head it kept."""
    from edgetl.device import HeadTrainConfig, Learner
    from edgetl.device.retrain import replay_held_back
    from edgetl.head.solver import gradient_max

    learner = Learner.open(bundle, store=Path(tempfile.mkdtemp()) / "r.sqlite", backend=LITERT, precision="int8")
    clock = InferenceClock(learner.bundle, learner.backbone_entry, photos(HYM / "train" / "ants")[0])
    clock.sample(50)
    learner.add(photos(HYM / "train" / "ants")[:per_class], "ants")
    learner.add(photos(HYM / "train" / "bees")[:per_class], "bees")
    import scipy.optimize  # noqa: F401  (imported once per process: not a training's cost)

    rows = []
    for name, cfg in ((f"default (L-BFGS, {HeadTrainConfig().subspace_dim}-d subspace)", HeadTrainConfig()),
                      ("L-BFGS, 192-d subspace", HeadTrainConfig(subspace_dim=192)),
                      ("L-BFGS, 128-d subspace", HeadTrainConfig(subspace_dim=128)),
                      ("L-BFGS, full feature space", HeadTrainConfig(subspace_dim=0)),
                      ("Adam, 300 full-batch steps (former default)", HeadTrainConfig(optimizer="adam"))):
        learner.rollback(1)
        t0 = time.perf_counter()
        first = learner.train(cfg)
        t_first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            learner.rollback(1)
            t0 = time.perf_counter()
            r = learner.train(cfg)
            times.append(time.perf_counter() - t0)
            clock.sample(15)  # the inference it is compared with, in between
        head = learner.store.head()
        ts = learner.training_set(head.labels)
        x, y, ids = ts.full(), ts.y, ts.ids
        # The kept head was fitted without every 5th replay photo of the bundle's classes (its check).
        fitted = ~replay_held_back(y, ids, [c for c, n in enumerate(head.labels) if n in learner.bundle.labels])
        bias = r.get("new_class_bias") or {}
        w, b = head.layers[-1]
        unbiased = [(w, b - np.isin(np.arange(len(b)), [head.labels.index(c) for c in bias.get("classes", [])]) *
                     bias.get("bias", 0.0))]
        solver = r.get("solver", {})
        rows.append({"recipe": name, "first_train_ms": round(1000 * t_first, 1),
                     "retrain_ms": round(1000 * float(np.median(times)), 1),
                     "x_inference": round(float(np.median(times)) / clock.seconds(), 1),
                     "subspace_dim": solver.get("subspace_dim"), "iterations": solver.get("iterations"),
                     "solver_grad_max": solver.get("grad_max"), "converged": solver.get("converged"),
                     "full_space_grad_max": gradient_max(unbiased, x[fitted], y[fitted], cfg.l2),
                     "samples": r["num_samples"], "held_back_replay": bias.get("held_back_replay"),
                     "bias": bias.get("bias"), "first_seconds_recorded": first["seconds"]})
    learner.close()
    return {"inference_ms": round(1000 * clock.seconds(), 3), "backbone_file": learner.backbone_entry["file"],
            "rows": rows}


def retrain_by_store_size(bundle: Path, sizes: tuple[int, ...] = (10, 25, 50, 100), repeats: int = 5) -> dict:
    """The default retrain as the store grows: ``n`` ants + ``n`` bees stored (a fresh store per
    size), median of ``repeats`` retrains (rollback 1 + train) after the first, against one
    inference measured in the same run. The stored photos add rows and, up to
    head_solver.RESIDUAL_DIRECTIONS, dimensions to the solve."""
    from edgetl.device import Learner

    ants, bees = photos(HYM / "train" / "ants"), photos(HYM / "train" / "bees")
    rows = []
    clock = None
    for n in sizes:
        if n > min(len(ants), len(bees)):
            continue
        learner = Learner.open(bundle, store=Path(tempfile.mkdtemp()) / "s.sqlite", backend=LITERT, precision="int8")
        if clock is None:
            clock = InferenceClock(learner.bundle, learner.backbone_entry, ants[0])
            clock.sample(50)
        learner.add(ants[:n], "ants")
        learner.add(bees[:n], "bees")
        learner.train()
        times = []
        for _ in range(repeats):
            learner.rollback(1)
            t0 = time.perf_counter()
            r = learner.train()
            times.append(time.perf_counter() - t0)
            clock.sample(15)
        learner.close()
        sv = r["solver"]
        rows.append({"stored_per_class": n, "samples": r["num_samples"], "subspace_dim": sv["subspace_dim"],
                     "from_samples": sv["from_samples"], "evaluations": sv["evaluations"],
                     "grad_max": sv["grad_max"], "retrain_ms": round(1000 * float(np.median(times)), 1),
                     "x_inference": round(float(np.median(times)) / clock.seconds(), 1)})
    return {"inference_ms": round(1000 * clock.seconds(), 3), "rows": rows}


WORKER = r"""
import json, sys, time, tempfile
t_start = float(sys.argv[3])
from pathlib import Path
import numpy as np
from edgetl.device import Learner, HeadTrainConfig
from edgetl.bench.benchmark import peak_rss_mb
from edgetl import preprocess
bundle, backend, rounds = sys.argv[1], sys.argv[2], int(sys.argv[5])
photos = [Path(p) for p in json.loads(sys.argv[4])]
store = Path(tempfile.mkdtemp()) / "s.sqlite"
L = Learner.open(bundle, store=store, backend=backend, precision="int8", threads=1)
L.predict([photos[0]])
cold = time.time() - t_start
# The backbone's own inference time: the model's input already made (as add makes it).
x = L.runner.prepare(preprocess.load_pixels(photos[0], L.spec.size)[0][None], L.spec)
for _ in range(5):
    L.runner.run_prepared(x)
# Rounds interleave the backbone alone, three 1-photo adds and one 10-photo add, so each
# ratio compares times taken seconds apart (these machines are shared and clocks drift).
ms = lambda v, q: 1000 * float(np.percentile(v, q))
bb, add1, add10, r1, r10 = [], [], [], [], []
it = iter(photos[1:])
for _ in range(rounds):
    t_bb = []
    for _ in range(10):
        t = time.perf_counter(); L.runner.run_prepared(x); t_bb.append(time.perf_counter() - t)
    bb += t_bb
    t_1 = []
    for _ in range(3):
        p = next(it)
        t = time.perf_counter(); L.add([p], "bench"); t_1.append(time.perf_counter() - t)
    add1 += t_1
    group = [next(it) for _ in range(10)]
    t = time.perf_counter(); L.add(group, "bench"); t_10 = (time.perf_counter() - t) / len(group)
    add10.append(t_10)
    r1.append(np.median(t_1) / np.median(t_bb))
    r10.append(t_10 / np.median(t_bb))
# Where a single-photo add goes: each step of one call, timed on its own (medians over 30 photos).
parts = {"read_sha256": [], "jpeg_decode": [], "resize": [], "model_input": [], "backbone": [], "commit_fsync": []}
for p in photos[1:31]:
    t0 = time.perf_counter(); data, digest = preprocess.read_file_bytes(p)
    t1 = time.perf_counter(); img = preprocess.decode_image(data, str(p), L.spec.size)
    t2 = time.perf_counter(); px = preprocess.resize_rgb(img, L.spec.size)
    t3 = time.perf_counter(); xi = L.runner.prepare(px[None], L.spec)
    t4 = time.perf_counter(); f = L.runner.run_prepared(xi)
    t5 = time.perf_counter(); L.store.add(f, "breakdown", [str(p)], [digest])
    t6 = time.perf_counter()
    for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
        parts[k].append(v)
breakdown = {k + "_ms": ms(v, 50) for k, v in parts.items()}
L.store.remove_label("bench")
L.store.remove_label("breakdown")
feats, digests, kept, _ = L.features(photos[:100])
for i in range(5):
    L.store.add(feats, f"c{i}", kept, digests)
# The issue's measure: 20 epochs of mini-batch (32) Adam over the 500 stored samples plus the replay set.
t = time.perf_counter(); r = L.train(HeadTrainConfig(epochs=20, batch_size=32, learning_rate=1e-3, l2=1e-4, optimizer="adam")); train_s = time.perf_counter() - t
t = time.perf_counter(); L.train(); default_s = time.perf_counter() - t  # the default: converged L-BFGS in the subspace
print(json.dumps({"backend": L.runner.backend, "file": L.backbone_entry["file"], "cold_start_s": cold, "rounds": rounds,
                  "backbone_p50_ms": ms(bb, 50), "backbone_p95_ms": ms(bb, 95),
                  "add_p50_ms": ms(add1, 50), "add_p95_ms": ms(add1, 95), "add_batch10_ms_per_image": ms(add10, 50),
                  "add_over_backbone": float(np.median(r1)), "add_batch10_over_backbone": float(np.median(r10)),
                  "retrain_500x20_s": train_s, "retrain_samples": r["num_samples"] - r["replay"], "retrain_replay": r["replay"],
                  "retrain_default_s": default_s, "add_1_photo_breakdown": breakdown, "peak_rss_mb": peak_rss_mb()}))
"""


def speed(bundle: Path, backend: str, rounds: int = 12) -> dict:
    pool = photos(FLOWERS / "train" / "daisy") + photos(FLOWERS / "train" / "roses")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", WORKER, str(bundle), backend, repr(t0),
                          json.dumps([str(p) for p in pool[: 1 + 13 * rounds]]), str(rounds)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_bundle(run: Path, out: Path) -> Path:
    from edgetl.export import export_run

    export_run(run, out, targets=["tflite:int8", "onnx:int8", "tflite-trainable"], roles=("backbone",), force=True)
    return out


def large_photo_decode(size: int = 224, repeats: int = 5) -> list[dict]:
    """ms to decode + resize a phone-sized JPEG: full decode vs libjpeg's reduced-scale decode.

    The photos in ../shared are at most 320 px, so the benchmark above never meets a large one;
    this re-saves a real bee photo at phone and camera sizes (quality 90).
    """
    import io

    from PIL import Image

    from edgetl import preprocess

    src = Image.open(photos(HYM / "train" / "bees")[0]).convert("RGB")
    rows = []
    for w, h in ((4032, 3024), (1920, 1080), (640, 480)):
        buf = io.BytesIO()
        src.resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        out = {}
        for name, draft in (("full", None), ("reduced", size)):
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                px = preprocess.resize_rgb(preprocess.decode_image(data, "x.jpg", draft), size)
                ts.append(time.perf_counter() - t)
            out[name] = (1000 * float(np.median(ts)), px.astype(np.int16))
        rows.append({"photo": f"{w}x{h}", "full_ms": out["full"][0], "reduced_ms": out["reduced"][0],
                     "mean_abs_pixel_diff": float(np.abs(out["full"][1] - out["reduced"][1]).mean())})
    return rows


def trainer_steps(bundle: Path, repeats: int = 200) -> list[dict]:
    """ms per training step, batch 1 and 32: the TFLite trainable head vs the NumPy trainer (1 thread)."""
    from edgetl.bundle import open_bundle
    from edgetl.head.fit import HeadTrainConfig, _Optimizer, class_weights, loss_and_grads
    from edgetl.head.tflite import TFLiteTrainableHead

    b = open_bundle(bundle)
    entry = b.pick("trainable_head")
    layers = b.head()
    head = TFLiteTrainableHead(b.path(entry), threads=1)
    head.restore(layers)
    opt = entry["optimizer"]
    cfg = HeadTrainConfig(optimizer="sgd", learning_rate=opt["learning_rate"], l2=opt["l2"], balance=False)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 32):
        x = rng.uniform(0, 6, (batch, b.feature_dim)).astype(np.float32)
        y = rng.integers(0, len(b.labels), batch)
        times = {"tflite": [], "numpy": []}
        np_layers = [(w.copy(), c.copy()) for w, c in layers]
        o = _Optimizer(cfg, np_layers)
        sw = class_weights(y, len(b.labels), False)
        for _ in range(repeats):
            t = time.perf_counter()
            head.train_step(x, y)
            times["tflite"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _, g = loss_and_grads(np_layers, x, y, sw, cfg.l2)
            np_layers = o.step(np_layers, g)
            times["numpy"].append(time.perf_counter() - t)
        for name, ts in times.items():
            rows.append({"trainer": name, "batch": batch, "p50_ms": 1000 * float(np.percentile(ts, 50)),
                         "p95_ms": 1000 * float(np.percentile(ts, 95))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="device bundle with int8 TFLite and ONNX backbones")
    p.add_argument("--run", type=Path, default=None, help="run folder to export the bundle from (needs TensorFlow)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--only", choices=["retrain"], default=None,
                   help="run one part: 'retrain' times the default retrain against one inference (seconds)")
    a = p.parse_args()
    bundle = a.bundle or RESULTS / "device_bundle"
    if a.run is not None:
        export_bundle(a.run, bundle)
    rt = retrain(bundle, a.per_class)
    print(f"retrain after adding {a.per_class} ants + {a.per_class} bees, against one {rt['backbone_file']} inference "
          f"({rt['inference_ms']:.2f} ms, batch 1, 1 thread, {cpu_line()}):")
    print(table(["recipe", "first ms", "retrain ms", "x inference", "dims", "iterations", "grad max",
                 "full-space grad max"],
                [[r["recipe"], r["first_train_ms"], r["retrain_ms"], r["x_inference"], r["subspace_dim"] or "",
                  r["iterations"] or "", f"{r['solver_grad_max']:.1e}" if r["solver_grad_max"] else "",
                  f"{r['full_space_grad_max']:.1e}"] for r in rt["rows"]]))
    print()
    if a.only == "retrain":
        sizes = retrain_by_store_size(bundle)
        print(f"the default retrain as the store grows (n ants + n bees stored; one inference "
              f"{sizes['inference_ms']:.2f} ms in this run):")
        print(table(["stored per class", "samples", "dims (from stored)", "evaluations", "grad max", "retrain ms",
                     "x inference"],
                    [[r["stored_per_class"], r["samples"], f"{r['subspace_dim']} ({r['from_samples']})", r["evaluations"],
                      f"{r['grad_max']:.1e}", r["retrain_ms"], r["x_inference"]] for r in sizes["rows"]]))
        print()
        print(f"wrote {write_json('device_retrain', {'bundle': str(bundle), 'retrain': rt, 'by_store_size': sizes})}")
        return
    q = quality(bundle, a.per_class)
    s = [speed(bundle, b) for b in BACKENDS]
    os.environ["OMP_NUM_THREADS"] = "1"
    steps = trainer_steps(bundle)
    decode = large_photo_decode()
    print("quality (LiteRT int8 backbone, default retrain):")
    print(table(["metric", "value"], [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in q.items()]))
    print()
    cols = ["backend", "backbone p50 ms", "p95 ms", "add 1 photo ms", "ratio", "add 10 photos ms/photo", "ratio",
            "retrain 500x20 s", "default retrain s", "cold start s", "peak RSS MB"]
    rows = [[r["backend"], f"{r['backbone_p50_ms']:.2f}", f"{r['backbone_p95_ms']:.2f}", f"{r['add_p50_ms']:.2f}",
             f"{r['add_over_backbone']:.2f}", f"{r['add_batch10_ms_per_image']:.2f}",
             f"{r['add_batch10_over_backbone']:.2f}", f"{r['retrain_500x20_s']:.3f}", f"{r['retrain_default_s']:.3f}",
             f"{r['cold_start_s']:.2f}", f"{r['peak_rss_mb']:.0f}"] for r in s]
    print(f"retrain: {s[0]['retrain_samples']} stored + {s[0]['retrain_replay']} replay samples")
    print()
    print("one single-photo add, step by step (ms, medians over 30 photos):")
    keys = list(s[0]["add_1_photo_breakdown"])
    print(table(["backend", *[k[:-3] for k in keys]],
                [[r["backend"], *[f"{r['add_1_photo_breakdown'][k]:.3f}" for k in keys]] for r in s]))
    print("speed and memory (1 thread, fresh process each):")
    print(table(cols, rows))
    print()
    print("head training step (1 thread):")
    print(table(["trainer", "batch", "p50 ms", "p95 ms"],
                [[r["trainer"], r["batch"], f"{r['p50_ms']:.3f}", f"{r['p95_ms']:.3f}"] for r in steps]))
    print()
    print("large JPEG decode + resize to 224 (ms):")
    print(table(["photo", "full decode", "reduced-scale decode", "mean |pixel diff|"],
                [[r["photo"], f"{r['full_ms']:.1f}", f"{r['reduced_ms']:.1f}", f"{r['mean_abs_pixel_diff']:.2f}"]
                 for r in decode]))
    path = write_json("device", {"bundle": str(bundle), "retrain": rt, "quality": q, "speed": s, "trainer_steps": steps,
                                 "large_photo_decode": decode})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
