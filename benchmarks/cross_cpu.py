"""Cross-CPU numbers: every model file of a bundle, on every CPU kind it ships to.

Three steps, so that the CPU-dependent one needs only ``edgetl[device]`` (it runs inside the
emulated Raspberry Pi and under ``qemu-x86_64 -cpu Haswell``):

    # 1. workstation (TensorFlow): the float Keras model's features and probabilities on N photos
    python benchmarks/cross_cpu.py reference --run runs/flowers --photos 100 --out benchmarks/results/cross_cpu
    # 2. on each CPU kind (no TensorFlow): run every file of the bundle on the same photos
    python benchmarks/cross_cpu.py measure --bundle models/flowers --dir benchmarks/results/cross_cpu --cpu native
    qemu-x86_64-static -cpu Haswell .venv/bin/python benchmarks/cross_cpu.py measure ... --cpu haswell --limit 20
    sudo bash device_scripts/emulate_pi.sh --steps install,crosscpu --bundle models/flowers --cpu cortex-a76
    # 3. the table: Markdown + JSON
    python benchmarks/cross_cpu.py table --dir benchmarks/results/cross_cpu [--name cross_cpu]

Per file and CPU: accuracy on the photos (flowers/test), top-1 agreement with the float Keras
classifier, and for backbones the cosine of its features to the Keras backbone's (mean, min);
a backbone is scored through the head the device uses with it. The trainable head runs
infer/train/save/restore on fixed inputs; its outputs are compared across CPUs. Each CPU's
raw outputs are kept (``<cpu>.npz`` in the working folder, not committed), so the table also
says how far each CPU is from the native x86 run (max abs difference; 0 = bit-identical). The
table goes to ``benchmarks/results/cross_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, SHARED, table  # noqa: E402

FLOWERS_TEST = SHARED / "datasets/flowers/test"
DEFAULT_DIR = RESULTS / "cross_cpu"


def reference(run: Path, photos: int, out: Path) -> None:
    """Keras float references (TensorFlow) for ``photos`` test photos, balanced over classes."""
    from edgetl.data import load_samples, scan_folder
    from edgetl.train.run import Run

    r = Run(run)
    folder = scan_folder(FLOWERS_TEST, classes=r.labels)
    per = -(-photos // len(r.labels))
    chosen = [s for c in range(len(r.labels)) for s in [x for x in folder.samples if x.label == c][:per]][:photos]
    x, y, bad = load_samples(chosen, r.preprocessing)
    if bad:
        raise SystemExit(f"unreadable reference photos: {bad}")
    feats = np.asarray(r.backbone_model.predict(x, batch_size=32, verbose=0), np.float32)
    probs = np.asarray(r.head_model.predict(feats, batch_size=256, verbose=0), np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "reference.npz", features=feats, probs=probs, labels=y,
             files=np.array([s.relpath for s in chosen]), label_names=np.array(r.labels))
    print(f"reference: {len(chosen)} photos of {FLOWERS_TEST}, Keras accuracy {float((probs.argmax(1) == y).mean()):.4f}"
          f" -> {out / 'reference.npz'}")


def _trainable_parity(bundle) -> dict[str, np.ndarray]:
    """infer/train/save/restore of the trainable head on fixed inputs (the phone's path)."""
    from edgetl.head.tflite import TFLiteTrainableHead

    entry = bundle.pick("trainable_head", required=False)
    if entry is None:
        return {}
    head = TFLiteTrainableHead(bundle.path(entry), threads=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, bundle.feature_dim)).astype(np.float32)
    y = rng.integers(0, len(bundle.labels), size=32).astype(np.int32)
    head.restore(bundle.head(), len(bundle.labels))
    before = head.infer(x)
    losses = np.array([head.train_step(x, y) for _ in range(5)], np.float32)
    after = head.infer(x)
    layers, mask = head.save()
    head.restore(layers, mask=mask)
    restored = head.infer(x)
    return {"trainable/infer": before, "trainable/loss": losses, "trainable/infer_after_train": after,
            "trainable/saved_W": layers[-1][0], "trainable/restored_infer": restored}


def measure(bundle_path: Path, ref_dir: Path, cpu: str, limit: int | None, threads: int,
            only: list[str] | None = None) -> None:
    from edgetl.bundle import open_bundle
    from edgetl.head.arrays import head_predict
    from edgetl.metrics import cosine
    from edgetl.preprocess import load_batch
    from edgetl.runtime import open_model, run_batched

    ref = np.load(ref_dir / "reference.npz")
    b = open_bundle(bundle_path)
    if list(ref["label_names"]) != b.labels:
        raise SystemExit(f"the reference's labels {list(ref['label_names'])} are not the bundle's {b.labels}")
    n = len(ref["labels"]) if limit is None else min(limit, len(ref["labels"]))
    # Photos spread over the classes when --limit takes fewer than all of them.
    idx = np.linspace(0, len(ref["labels"]) - 1, n).round().astype(int) if n < len(ref["labels"]) else np.arange(n)
    files = [str(FLOWERS_TEST / f) for f in ref["files"][idx]]
    y, kprobs, kfeats = ref["labels"][idx], ref["probs"][idx], ref["features"][idx]
    x, _, bad = load_batch(files, b.preprocessing)
    if bad:
        raise SystemExit(f"unreadable photos: {bad}")
    keras_pred = kprobs.argmax(1)
    rows, raw = [], {}
    for entry in [e for e in b.files if e["role"] in ("backbone", "classifier") and (not only or e["file"] in only)]:
        t0 = time.perf_counter()
        runner = open_model(b.path(entry), threads=threads)
        out = run_batched(runner, x, batch=1)
        seconds = (time.perf_counter() - t0) / n
        row = {"file": entry["file"], "role": entry["role"], "format": entry["format"],
               "precision": entry.get("precision"), "runtime": runner.backend, "photos": int(n),
               "seconds_per_photo": round(seconds, 4)}
        if entry["role"] == "backbone":
            cos = cosine(out, kfeats)
            row.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
            probs = head_predict(out, b.head(entry))
        else:
            probs = out
        pred = probs.argmax(1)
        row.update(accuracy=float((pred == y).mean()), keras_accuracy=float((keras_pred == y).mean()),
                   agreement=float((pred == keras_pred).mean()))
        row["drop_points"] = round(100 * (row["keras_accuracy"] - row["accuracy"]), 2)
        raw[entry["file"]] = out
        raw[f"{entry['file']}/photo_index"] = idx
        rows.append(row)
        print(f"{cpu}: {entry['file']}: acc {row['accuracy']:.3f} (Keras {row['keras_accuracy']:.3f}), agreement "
              f"{row['agreement']:.3f}" + (f", cosine {row['cosine_mean']:.4f} (min {row['cosine_min']:.4f})"
                                           if "cosine_mean" in row else "") + f", {seconds:.2f} s/photo", flush=True)
    raw.update(_trainable_parity(b))
    # Files measured before for this CPU (e.g. the slow ones on fewer photos) are kept.
    old_json, old_npz = ref_dir / f"{cpu}.json", ref_dir / f"{cpu}.npz"
    if only and old_json.exists() and old_npz.exists():
        kept = [r for r in json.loads(old_json.read_text())["rows"] if r["file"] not in raw]
        with np.load(old_npz) as z:
            raw = {**{k: z[k] for k in z.files if k.split("/")[0] not in raw}, **raw}
        rows = kept + rows
    from edgetl.bundle.selftest import cpu_fingerprint

    doc = {"cpu": cpu, "fingerprint": cpu_fingerprint(), "python": platform.python_version(),
           "bundle": str(bundle_path), "rows": rows, "versions": _versions()}
    (ref_dir / f"{cpu}.json").write_text(json.dumps(doc, indent=2) + "\n")
    np.savez(ref_dir / f"{cpu}.npz", **raw)
    print(f"wrote {ref_dir / (cpu + '.json')}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("ai-edge-litert", "onnxruntime", "numpy", "pillow"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


CPU_ORDER = ("native", "haswell", "cortex-a72", "cortex-a76")


def make_table(ref_dir: Path, name: str = "cross_cpu") -> None:
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(ref_dir.glob("*.json")) if p.stem != "cross_cpu"}
    cpus = sorted(docs, key=lambda c: (CPU_ORDER.index(c) if c in CPU_ORDER else 99, c))
    base = np.load(ref_dir / "native.npz") if (ref_dir / "native.npz").exists() else None
    out_rows, md_rows = [], []
    for cpu in cpus:
        raw = np.load(ref_dir / f"{cpu}.npz")
        for r in docs[cpu]["rows"]:
            diff = None
            idx = raw[f"{r['file']}/photo_index"]
            if base is not None and r["file"] in base.files:
                pos = {int(i): k for k, i in enumerate(base[f"{r['file']}/photo_index"])}
                mine = [k for k, i in enumerate(idx) if int(i) in pos]
                if mine:
                    theirs = [pos[int(idx[k])] for k in mine]
                    diff = float(np.abs(raw[r["file"]][mine] - base[r["file"]][theirs]).max())
            r = {**r, "cpu": cpu, "max_abs_diff_vs_native": diff}
            out_rows.append(r)
            md_rows.append([cpu, r["file"], r["photos"], f"{r['accuracy']:.3f}", f"{-r['drop_points']:+.1f}",
                            f"{r['agreement']:.3f}",
                            f"{r['cosine_mean']:.4f}" if "cosine_mean" in r else "",
                            f"{r['cosine_min']:.4f}" if "cosine_min" in r else "",
                            "" if diff is None else f"{diff:.2g}"])
    trainable = {}
    if base is not None:
        for cpu in cpus:
            raw = np.load(ref_dir / f"{cpu}.npz")
            keys = [k for k in raw.files if k.startswith("trainable/")]
            if keys and all(k in base.files for k in keys):
                trainable[cpu] = max(float(np.abs(raw[k] - base[k]).max()) for k in keys)
    fingerprints = {c: {**docs[c]["fingerprint"], "python": docs[c]["python"], **docs[c]["versions"]} for c in cpus}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"rows": out_rows, "trainable_head_max_abs_diff_vs_native": trainable, "cpus": fingerprints}, indent=2) + "\n")
    lines = [table(["cpu", "file", "photos", "accuracy", "vs Keras pts", "agreement", "cosine mean", "cosine min",
                    "max abs diff vs native"], md_rows)]
    if trainable:
        lines.append("\nTrainable head (infer, 5 train steps, save, restore on fixed inputs), max abs difference "
                     "to native x86: " + ", ".join(f"{c} {v:.1e}" for c, v in trainable.items()))
    lines.append("\nCPUs: " + "; ".join(f"{c}: {f['machine']} {f['model'] or ''} [{' '.join(f['flags'])}], "
                                         f"Python {f['python']}" for c, f in fingerprints.items()))
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    r = sub.add_parser("reference", help="Keras float references (workstation, TensorFlow)")
    r.add_argument("--run", type=Path, required=True)
    r.add_argument("--photos", type=int, default=100)
    r.add_argument("--out", type=Path, default=DEFAULT_DIR)
    m = sub.add_parser("measure", help="run every file of the bundle on this CPU (edgetl[device] only)")
    m.add_argument("--bundle", type=Path, required=True)
    m.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    m.add_argument("--cpu", required=True, help="a name for this CPU kind: native, haswell, cortex-a72, ...")
    m.add_argument("--limit", type=int, default=None, help="use only this many of the reference photos")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--files", nargs="*", default=None, help="only these files of the bundle (default: all)")
    t = sub.add_parser("table", help="Markdown + JSON from every measured CPU")
    t.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    t.add_argument("--name", default="cross_cpu",
                   help="write benchmarks/results/NAME.md and .json (a partial re-run keeps the full table)")
    a = p.parse_args(argv)
    if a.step == "reference":
        reference(a.run, a.photos, a.out)
    elif a.step == "measure":
        measure(a.bundle, a.dir, a.cpu, a.limit, a.threads, a.files)
    else:
        make_table(a.dir, a.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
