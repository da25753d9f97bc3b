"""What was tried to learn new classes on the device from 10 photos each (a tuning study).

The device benchmark adds 10 ants + 10 bees (hymenoptera/train) to the five-flower bundle
and scores hymenoptera/val and flowers/test. To choose a method WITHOUT touching those, this
script scores each variant on a tuning split: other hymenoptera/train photos (ants and bees
#11-70) for the new classes, and the flowers run's validation split for the old ones.

Variants: the former default (20 replay photos per class, 20 epochs of mini-batch Adam from
the workstation head) and its learning rates, L2-SP, nearest class mean, k-NN, Euclidean mean
units, augmented views of the added photos; then the converged, L2-regularised retrain (the
current default) over replay sizes and L2 strengths; and an oracle that gives the retrain
more photos of the new classes than the benchmark allows (30 and 60 instead of 10), to show
how far the backbone's features are from the 0.85 floor.

    python benchmarks/personalization_variants.py --bundle benchmarks/results/device_bundle \
        --run runs/flowers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, table, write_json  # noqa: E402
from edgetl.formats import LITERT  # noqa: E402


def main() -> None:
    from edgetl.device import HeadTrainConfig, Learner
    from edgetl.head.arrays import head_predict
    from edgetl.head.fit import (
        _Optimizer,
        add_classes,
        class_weights,
        epoch_orders,
        loss_and_grads,
        train_head,
    )
    from edgetl.head.ncm import ncm_predict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, help="the run folder the bundle was exported from")
    a = p.parse_args()

    run = json.loads((a.run / "run.json").read_text())
    hym = SHARED / "datasets/hymenoptera/train"
    ants = sorted((hym / "ants").glob("*.jpg"))
    bees = sorted((hym / "bees").glob("*.jpg"))
    learner = Learner.open(a.bundle, store=Path(tempfile.mkdtemp()) / "s.sqlite", backend=LITERT, precision="int8")
    old = learner.labels()
    w_head = learner.store.head().layers
    na, nb = len(old), len(old) + 1
    labels = old + ["ants", "bees"]
    root = Path(run["data"]["train_dir"])

    def feats(files):
        f, _, kept, errors = learner.features(files)
        assert not errors, errors
        return f

    def flower_labels(rel):
        return np.array([old.index(Path(f).parent.name) for f in rel])

    fv, yv = feats([root / f for f in run["val_files"]]), flower_labels(run["val_files"])
    ftr, ytr = feats([root / f for f in run["train_files"]]), flower_labels(run["train_files"])
    fa, fb = feats(ants[10:70]), feats(bees[10:70])  # the tuning photos of the new classes
    shots_a, shots_b = feats(ants[:10] + ants[70:120]), feats(bees[:10] + bees[70:120])  # 10 (+50 for the oracle)

    def training_set(replay: int, shots: int = 10):
        """The first ``replay`` training photos of each flower class (the exporter's order) + the shots."""
        idx = np.concatenate([np.flatnonzero(ytr == c)[:replay] for c in range(len(old))])
        x = np.concatenate([ftr[idx], shots_a[:shots], shots_b[:shots]]).astype(np.float32)
        y = np.concatenate([ytr[idx], np.full(shots, na), np.full(shots, nb)])
        return x, y, add_classes(w_head, x, y, [na, nb])

    def score(predict) -> list:
        pf, pa, pb = predict(fv), predict(fa), predict(fb)
        new = ((pa == na).mean() + (pb == nb).mean()) / 2
        return [f"{(pf == yv).mean():.3f}", f"{new:.3f}", f"{(pa == na).mean():.2f}", f"{(pb == nb).mean():.2f}"]

    def head(layers):
        return lambda z: head_predict(z, layers).argmax(1)

    x, y, start = training_set(20)
    rows = [["workstation head (before)", *score(head(w_head))],
            ["prototype init only", *score(head(start))]]

    # The former default and its variants: 20 replay photos per class, early stopping near the head.
    for epochs, lr in ((20, 1e-3), (20, 3e-3), (20, 1e-2), (50, 3e-3)):
        layers, _ = train_head(start, x, y, HeadTrainConfig(epochs=epochs, batch_size=32, learning_rate=lr, l2=1e-4))
        name = f"replay 20, Adam {lr:g}, batch 32, {epochs} ep" + (" (former default)" if (epochs, lr) == (20, 1e-3) else "")
        rows.append([name, *score(head(layers))])

    def l2sp(lam: float, epochs: int, lr: float):
        """Old classes pulled toward their starting weights instead of toward zero."""
        cfg = HeadTrainConfig(epochs=epochs, batch_size=32, learning_rate=lr)
        sw = class_weights(y, len(labels), True)
        layers = [(w.copy(), b.copy()) for w, b in start]
        opt = _Optimizer(cfg, layers)
        w0 = start[0][0]
        for order in epoch_orders(len(x), cfg.epochs, cfg.seed):
            for s in range(0, len(order), cfg.batch_size):
                i = order[s : s + cfg.batch_size]
                _, g = loss_and_grads(layers, x[i], y[i], sw[i], 0.0)
                gw = g[0][0].copy()
                gw[:, :na] += lam * (layers[0][0][:, :na] - w0[:, :na])
                layers = opt.step(layers, [(gw, g[0][1])])
        return layers

    for lam, lr in ((0.1, 3e-3), (0.1, 1e-2), (1.0, 3e-3)):
        rows.append([f"replay 20, L2-SP lambda {lam:g}, Adam {lr:g}, 20 ep", *score(head(l2sp(lam, 20, lr)))])
    means = np.stack([x[y == c].mean(0) for c in range(len(labels))])
    rows.append(["replay 20, nearest class mean (--mode ncm)", *score(lambda z: ncm_predict(z, means).argmax(1))])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for k in (1, 5):
        def knn(z, k=k):
            zn = z / np.linalg.norm(z, axis=1, keepdims=True)
            idx = np.argsort(-(zn @ xn.T), axis=1)[:, :k]
            return np.array([np.bincount(y[r], minlength=len(labels)).argmax() for r in idx])
        rows.append([f"replay 20, {k}-nearest neighbours (cosine)", *score(knn)])
    # Euclidean nearest-mean units for the new classes (w = tau * mean, b = -tau |mean|^2 / 2), old head kept.
    w_old, b_old = w_head[0]
    mu = np.stack([x[y == c].mean(0) for c in (na, nb)], axis=1)
    for tau in (0.05, 0.1, 0.2):
        layers = [(np.concatenate([w_old, tau * mu], 1).astype(np.float32),
                   np.concatenate([b_old, -tau * (mu * mu).sum(0) / 2]).astype(np.float32))]
        rows.append([f"Euclidean mean units, tau {tau:g}", *score(head(layers))])

    # Augmented views of each added photo (mirror, three 80 % crops): more backbone passes per add.
    from PIL import ImageOps

    from edgetl import preprocess

    def view_features(paths, n):
        out = []
        for path in paths:
            img, _ = preprocess.read_image_file(path)
            w, h = img.size
            c = int(min(w, h) * 0.8)
            views = [img, ImageOps.mirror(img)] + [img.crop((x0, y0, x0 + c, y0 + c))
                                                   for x0, y0 in ((0, 0), (w - c, h - c), ((w - c) // 2, (h - c) // 2))]
            for v in views[:n]:
                px = preprocess.resize_rgb(v, learner.spec.size)[None]
                out.append(learner.runner.run_prepared(learner.runner.prepare(px, learner.spec))[0])
        return np.array(out)

    replay = y < na
    for n in (2, 5):
        va, vb = view_features(ants[:10], n), view_features(bees[:10], n)
        xv = np.concatenate([x[replay], va, vb])
        yv_ = np.concatenate([y[replay], np.full(len(va), na), np.full(len(vb), nb)])
        init = add_classes(w_head, xv, yv_, [na, nb])
        layers, _ = train_head(init, xv, yv_, HeadTrainConfig(epochs=20, batch_size=32, learning_rate=3e-3, l2=1e-4))
        rows.append([f"replay 20, {n} views per added photo, Adam 0.003", *score(head(layers))])

    # More replay with the former (early-stopped) recipe: the new classes get worse.
    for rep in (50, 100):
        xr, yr, init = training_set(rep)
        layers, _ = train_head(init, xr, yr, HeadTrainConfig(epochs=20, batch_size=32, learning_rate=3e-3, l2=1e-4))
        rows.append([f"replay {rep}, Adam 0.003, batch 32, 20 ep", *score(head(layers))])

    # The converged, L2-regularised retrain (full-batch Adam, 300 steps) over replay size and L2.
    default = HeadTrainConfig()
    per_class = int(np.bincount(ytr).max())
    for rep in (20, 50, 100, 256):
        xr, yr, init = training_set(rep)
        for l2 in (0.03, 0.1, 0.3, 1.0):
            layers, _ = train_head(init, xr, yr, HeadTrainConfig(l2=l2))
            is_default = rep == 256 and l2 == default.l2
            name = f"replay {min(rep, per_class)}, full batch, L2 {l2:g}, 300 steps" + (" (default)" if is_default else "")
            rows.append([name, *score(head(layers))])

    # Oracle: the default recipe with MORE photos of the new classes than the benchmark allows.
    for shots in (10, 30, 60):
        xr, yr, init = training_set(256, shots)
        layers, _ = train_head(init, xr, yr, default)
        rows.append([f"oracle: default with {shots} photos per new class", *score(head(layers))])

    cols = ["variant", "flowers val", "new classes", "ants", "bees"]
    print(table(cols, rows))
    path = write_json("personalization_variants", {"columns": cols, "rows": rows,
                                                   "tuning_split": "ants/bees #11-70 of hymenoptera/train; "
                                                                   "the run's flowers validation split"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
