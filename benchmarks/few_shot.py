"""New classes from 1, 5 and 10 photos on the device: what each head recipe recognises, and
what it costs the bundle's own classes.

    python benchmarks/few_shot.py --bundle models/flowers_mixed [--seeds 5]

Ants and bees (k photos each, drawn at random from hymenoptera/train, ``--seeds`` draws) are
added to a flowers bundle's replay features; the head is retrained; new-class accuracy is
measured on all of hymenoptera/val and old-class accuracy on flowers/test (500), both over all
7 classes, through the bundle's preferred backbone file. Recipes:

* the device default (300 full-batch Adam steps, L2 0.3, from the active head);
* the converged solver (edgetl.head_solver, L-BFGS) at L2 0.3 and 0.03;
* nearest class mean, on raw features and on centred + L2-normalised ones (SimpleShot);
* L-BFGS on centred + L2-normalised features;
* L-BFGS + a bias for the new classes chosen on held-back replay (what ``Learner.train`` does):
  every 5th replay feature of each old class is held back; a head of the old classes alone and
  one with the new classes are fitted without them; the largest bias (0-4 in steps of 0.25) that
  keeps the held-back photos within ``--budget`` of the first head's accuracy is added to the
  new classes of the head fitted on everything (no test photo is used to choose it).

Then, through the device's own ``Learner`` (a temporary store, the first 10 photos of each
class in file order, the default trainer): new and old classes with the default calibration and
with ``old_class_budget=None``, and what the training recorded (bias, held-back costs).

Prints the tables, writes benchmarks/results/few_shot.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, table, write_json  # noqa: E402


def features(bundle, entry, paths: list[Path]) -> np.ndarray:
    from edgetl import preprocess

    r = bundle.open_model(entry, threads=2)
    out = [r.run_prepared(r.prepare(preprocess.load_pixels(p, bundle.preprocessing.size)[0][None],
                                    bundle.preprocessing)) for p in paths]
    return np.concatenate(out).astype(np.float32)


def through_learner(bundle: Path, hym: Path) -> list[dict]:
    """ants + bees from their first 10 photos, through Learner.add/train/evaluate."""
    import tempfile

    from edgetl.device import HeadTrainConfig, Learner

    rows = []
    for name, cfg in (("default (Adam, old_class_budget 0.02)", HeadTrainConfig()),
                      ("no calibration (old_class_budget None)", HeadTrainConfig(old_class_budget=None))):
        with tempfile.TemporaryDirectory(prefix="edgetl-few-shot-") as tmp:
            learner = Learner.open(bundle, store=Path(tmp) / "store.sqlite", threads=1)
            try:
                for c in ("ants", "bees"):
                    learner.add(sorted((hym / "train" / c).glob("*.jpg"))[:10], c)
                r = learner.train(cfg)
                new = learner.evaluate(hym / "val")["accuracy"]
                old = learner.evaluate(SHARED / "datasets/flowers/test")["accuracy"]
            finally:
                learner.close()
        b = r.get("new_class_bias")
        rows.append({"recipe": name, "new_classes_accuracy": new, "old_classes_accuracy": old,
                     "activated": r["activated"],
                     **({"bias": b["bias"], "held_back_cost": b["cost"], "held_back_cost_without_bias":
                         b["cost_without_bias"], "held_back_replay": b["held_back_replay"]} if b else {})})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.02)
    args = ap.parse_args()

    from edgetl.bundle import open_bundle
    from edgetl.device.headtrain import HeadTrainConfig, add_classes, ncm_predict, train_head
    from edgetl.head_arrays import head_predict
    from edgetl.head_solver import solve_softmax
    from edgetl.selftest import cpu_fingerprint, describe_cpu

    b = open_bundle(args.bundle)
    entry = b.pick("backbone")
    hym = SHARED / "datasets/hymenoptera"
    train = {c: features(b, entry, sorted((hym / "train" / c).glob("*.jpg"))) for c in ("ants", "bees")}
    val = {c: features(b, entry, sorted((hym / "val" / c).glob("*.jpg"))) for c in ("ants", "bees")}
    test_paths = sorted((SHARED / "datasets/flowers/test").glob("*/*.jpg"))
    fx = features(b, entry, test_paths)
    fy = np.array([b.labels.index(p.parent.name) for p in test_paths])
    rx, ry = b.replay(entry)
    rx = rx.astype(np.float32)
    head0 = b.head(entry)
    k_old = len(b.labels)
    vx = np.concatenate([val["ants"], val["bees"]])
    vy = np.array([k_old] * len(val["ants"]) + [k_old + 1] * len(val["bees"]))
    base_old = float((head_predict(fx, head0).argmax(1) == fy).mean())
    mean = rx.mean(0)

    def norm(x):
        x = x - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def logits(x, layers):
        w, bias = layers[-1]
        return x @ w + bias

    back = np.zeros(len(ry), bool)
    for c in range(k_old):
        back[np.flatnonzero(ry == c)[4::5]] = True
    old_only, _ = solve_softmax(rx[~back], ry[~back], k_old, 0.3)
    reference = float((logits(rx[back], old_only).argmax(1) == ry[back]).mean())

    def calibrated(x_new, y_new, l2):
        layers, _ = solve_softmax(np.concatenate([rx[~back], x_new]), np.concatenate([ry[~back], y_new]),
                                  k_old + 2, l2)
        zb = logits(rx[back], layers)
        chosen = 0.0
        for delta in np.arange(0.25, 4.01, 0.25):
            off = np.zeros(k_old + 2)
            off[k_old:] = delta
            if reference - ((zb + off).argmax(1) == ry[back]).mean() > args.budget + 1e-9:
                break
            chosen = float(delta)
        final, _ = solve_softmax(np.concatenate([rx, x_new]), np.concatenate([ry, y_new]), k_old + 2, l2, init=layers)
        off = np.zeros(k_old + 2)
        off[k_old:] = chosen
        return lambda x: logits(x, final) + off, chosen

    results: dict[str, dict[int, list]] = {}
    for k in (1, 5, 10):
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            picks = {c: train[c][rng.choice(len(train[c]), k, replace=False)] for c in ("ants", "bees")}
            nx = np.concatenate([picks["ants"], picks["bees"]])
            ny = np.array([k_old] * k + [k_old + 1] * k)
            x, y = np.concatenate([rx, nx]), np.concatenate([ry, ny])

            def score(name, on_val, on_test, extra=None, k=k):
                results.setdefault(name, {}).setdefault(k, []).append(
                    (float((on_val.argmax(1) == vy).mean()), float((on_test.argmax(1) == fy).mean()), extra))

            layers, _ = train_head(add_classes(head0, x, y, [k_old, k_old + 1]), x, y, HeadTrainConfig())
            score("device default (Adam 300 steps, L2 0.3)", head_predict(vx, layers), head_predict(fx, layers))
            for l2 in (0.3, 0.03):
                layers, _ = solve_softmax(x, y, k_old + 2, l2)
                score(f"L-BFGS, L2 {l2}", head_predict(vx, layers), head_predict(fx, layers))
            means = np.stack([x[y == c].mean(0) for c in range(k_old + 2)])
            score("nearest class mean (raw)", ncm_predict(vx, means), ncm_predict(fx, means))
            xn = norm(x)
            means = np.stack([xn[y == c].mean(0) for c in range(k_old + 2)])
            score("nearest class mean (centred, L2-normalised)", ncm_predict(norm(vx), means),
                  ncm_predict(norm(fx), means))
            layers, _ = solve_softmax(xn, y, k_old + 2, 1e-3)
            score("L-BFGS on centred, L2-normalised, L2 1e-3", head_predict(norm(vx), layers),
                  head_predict(norm(fx), layers))
            f, delta = calibrated(nx, ny, 0.3)
            score(f"L-BFGS L2 0.3 + new-class bias (held-back replay, budget {args.budget})", f(vx), f(fx), delta)
    rows, doc = [], []
    for name, by_k in results.items():
        row = [name]
        for k in (1, 5, 10):
            a = np.array([r[:2] for r in by_k[k]])
            row += [f"{a[:, 0].mean():.3f}", f"{a[:, 1].mean():.3f}"]
            deltas = [r[2] for r in by_k[k] if r[2] is not None]
            doc.append({"recipe": name, "photos_per_class": k, "draws": len(by_k[k]),
                        "new_classes_accuracy": float(a[:, 0].mean()), "old_classes_accuracy": float(a[:, 1].mean()),
                        **({"bias_mean": float(np.mean(deltas))} if deltas else {})})
        rows.append(row)
    learner_rows = through_learner(args.bundle, hym)
    cpu = cpu_fingerprint()
    print(f"{entry['file']} of {args.bundle}; flowers/test with the bundle's head: {base_old:.3f}; "
          f"{args.seeds} draws per k; {describe_cpu(cpu)}")
    print(table(["recipe", "k=1 new", "k=1 old", "k=5 new", "k=5 old", "k=10 new", "k=10 old"], rows))
    print(table(["Learner, first 10 photos per class", "new classes", "old classes", "bias", "held-back cost"],
                [[r["recipe"], f"{r['new_classes_accuracy']:.3f}", f"{r['old_classes_accuracy']:.3f}",
                  r.get("bias", ""), r.get("held_back_cost", "")] for r in learner_rows]))
    path = write_json("few_shot", {"bundle": str(args.bundle), "backbone_file": entry["file"],
                                   "old_classes_accuracy_before": base_old, "budget": args.budget, "rows": doc,
                                   "learner": learner_rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
