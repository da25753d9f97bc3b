"""How ``--fine-tune``'s defaults were chosen: variants of the recipe on the validation split only.

Each variant is a real ``edgetl train --fine-tune`` (``edgetl.train.train``) on the training
folder with its validation split (20 %, the default), fine-tuned model always kept and not
refitted on all photos (``fine_tune_keep="always"``, ``final_fit="train"``), so that its
validation accuracy is that of a model that never saw those photos. The test photos are never
read. One feature cache serves every variant; each computes its own trunk views.

    python benchmarks/fine_tune_sweep.py                     # flowers/train, 10 variants (~45 min on 2 cores)
    python benchmarks/fine_tune_sweep.py --only recipe,lr_1e-4
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

RECIPE = {"fine_tune": True}
# name -> (what changes against the recipe, TrainConfig fields)
VARIANTS = {
    "head_alone": ("no fine-tuning (the head-only default)", {}),
    "recipe": ("the recipe: from block_13_expand, 3e-4, 4 views, dropout 0.5", RECIPE),
    "from_block_16": ("from block_16_expand", {**RECIPE, "fine_tune_from": "block_16_expand"}),
    "from_block_15": ("from block_15_expand", {**RECIPE, "fine_tune_from": "block_15_expand"}),
    "from_block_10": ("from block_10_expand (a stage lower)", {**RECIPE, "fine_tune_from": "block_10_expand"}),
    "from_block_6": ("from block_6_expand (two stages lower)", {**RECIPE, "fine_tune_from": "block_6_expand"}),
    "one_view": ("1 view (no mirror, no crops)", {**RECIPE, "fine_tune_views": 1}),
    "lr_1e-4": ("peak learning rate 1e-4", {**RECIPE, "fine_tune_lr": 1e-4}),
    "lr_1e-3": ("peak learning rate 1e-3", {**RECIPE, "fine_tune_lr": 1e-3}),
    "dropout_0.2": ("head dropout 0.2", {**RECIPE, "dropout": 0.2}),
}


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
        r = {"variant": name, "what": what, "fields": fields, "val_accuracy": s["val_accuracy"],
             "val_loss": s["val_loss"], "num_train": s["num_train"], "num_val": s["num_val"],
             "best_epoch": ft.get("best_epoch"), "epochs_run": ft.get("epochs_run"),
             "layers_trained": ft.get("layers_trained"), "fine_tune_s": s["timings_s"]["fine_tune"],
             "wall_s": round(wall, 1)}
        results.append(r)
        rows.append([name, what, f"{r['val_accuracy']:.3f}", f"{r['val_loss']:.3f}",
                     r["best_epoch"] if ft else "", f"{r['fine_tune_s']:.0f}"])
        print(f"{name}: validation {r['val_accuracy']:.4f} (loss {r['val_loss']:.4f}), {wall:.0f} s", flush=True)
    print(table(["variant", "what", "val acc", "val loss", "best epoch", "fine-tune s"], rows))
    path = write_json(a.name, {"date": time.strftime("%Y-%m-%d"), "train": str(a.train), "seed": a.seed,
                               "num_val": results[0]["num_val"], "variants": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
