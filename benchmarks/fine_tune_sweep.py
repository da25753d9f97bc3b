"""How ``--fine-tune``'s defaults were chosen: variants of the recipe on the validation split only.

Each variant is a real ``edgetl train --fine-tune`` (``edgetl.train.train``) on the training
folder with its validation split (20 %, the default), fine-tuned model always kept and not
refitted on all photos (``fine_tune_keep="always"``, ``final_fit="train"``), so that its
validation accuracy is that of a model that never saw those photos. The test photos are never
read. One feature cache serves every variant; each computes its own trunk views.

    python benchmarks/fine_tune_sweep.py                     # flowers/train, 14 variants (~70 min on 2 cores)
    python benchmarks/fine_tune_sweep.py --only b13,b10 --seed 1
    python benchmarks/fine_tune_sweep.py --train ../shared/datasets/hymenoptera/train --name fine_tune_sweep_hymenoptera

Prints a table and writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, offline_keras_cache, table, write_json  # noqa: E402

# name -> (what changes, TrainConfig fields); every variant names its layer and learning rate, so
# that a name keeps its meaning when the defaults move.
VARIANTS = {"head_alone": ("no fine-tuning (the head-only default)", {})}
for _layer, _what in (("16", ""), ("15", ""), ("13", " (the default until 2026-12-05)"), ("10", " (the default)"),
                      ("6", "")):
    VARIANTS[f"b{_layer}"] = (f"from block_{_layer}_expand, 3e-4, 4 views{_what}",
                              {"fine_tune": True, "fine_tune_from": f"block_{_layer}_expand", "fine_tune_lr": 3e-4})
for _layer in ("13", "10"):
    _base = {"fine_tune": True, "fine_tune_from": f"block_{_layer}_expand", "fine_tune_lr": 3e-4}
    VARIANTS[f"b{_layer}_lr_1e-4"] = (f"from block_{_layer}_expand, 1e-4", {**_base, "fine_tune_lr": 1e-4})
    VARIANTS[f"b{_layer}_lr_1e-3"] = (f"from block_{_layer}_expand, 1e-3", {**_base, "fine_tune_lr": 1e-3})
    VARIANTS[f"b{_layer}_one_view"] = (f"from block_{_layer}_expand, 3e-4, 1 view (no mirror, no crops)",
                                       {**_base, "fine_tune_views": 1})
    VARIANTS[f"b{_layer}_dropout_0.2"] = (f"from block_{_layer}_expand, 3e-4, head dropout 0.2",
                                          {**_base, "dropout": 0.2})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, default=SHARED / "datasets/flowers/train")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all): " + ", ".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="fine_tune_sweep")
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    offline_keras_cache()
    from edgetl.train import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="edgetl-sweep-"))
    rows, results = [], []
    for name in names:
        what, fields = VARIANTS[name]
        cfg = TrainConfig(data_dir=str(a.train), out_dir=str(work / name), cache_dir=str(work / "cache"),
                          final_fit="train", fine_tune_keep="always", seed=a.seed, **fields)
        t0 = time.perf_counter()
        s = train(cfg)
        wall = time.perf_counter() - t0
        ft = s["fine_tune"] or {}
        r = {"variant": name, "seed": a.seed, "what": what, "fields": fields, "val_accuracy": s["val_accuracy"],
             "val_loss": s["val_loss"], "num_train": s["num_train"], "num_val": s["num_val"],
             "best_epoch": ft.get("best_epoch"), "epochs_run": ft.get("epochs_run"),
             "layers_trained": ft.get("layers_trained"), "fine_tune_s": s["timings_s"]["fine_tune"],
             "wall_s": round(wall, 1)}
        results.append(r)
        rows.append([name, what, f"{r['val_accuracy']:.3f}", f"{r['val_loss']:.3f}",
                     r["best_epoch"] if ft else "", f"{r['fine_tune_s']:.0f}"])
        print(f"{name}: validation {r['val_accuracy']:.4f} (loss {r['val_loss']:.4f}), {wall:.0f} s", flush=True)
    print(table(["variant", "what", "val acc", "val loss", "best epoch", "fine-tune s"], rows))
    path = write_json(a.name, {"date": time.strftime("%Y-%m-%d"), "train": str(a.train),
                               "num_val": results[0]["num_val"], "runs": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
