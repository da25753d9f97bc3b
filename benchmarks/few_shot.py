"""New classes from 1, 5 and 10 photos on the device: what each head recipe recognises, and
what it costs the bundle's own classes.

    python benchmarks/few_shot.py --bundle models/flowers_mixed [--seeds 5]
    python benchmarks/few_shot.py --bundle models/flowers_v3 --seeds 3 --learner-only \
        [--ks 1,5,10] [--subspace-dim 192] [--residual-directions 256] [--force]

(``--learner-only``: the device's Learner table alone, with those retrain settings, written to
benchmarks/results/few_shot_learner.json; how the defaults' 160 principal and 64 stored-photo
directions were compared with 192/128 and 256.)

Ants and bees (k photos each, drawn at random from hymenoptera/train, ``--seeds`` draws) are
added to a flowers bundle's replay features; the head is retrained; new-class accuracy is
measured on all of hymenoptera/val and old-class accuracy on flowers/test (500), both over all
7 classes, through the bundle's preferred backbone file. Recipes:

* the former device default (300 full-batch Adam steps, L2 0.3, from the active head);
* the converged solver (edgetl.head.solver, L-BFGS) at L2 0.3 and 0.03;
* nearest class mean, on raw features and on centred + L2-normalised ones (SimpleShot);
* L-BFGS on centred + L2-normalised features;
* L-BFGS + a bias for the new classes chosen on held-back replay (what ``Learner.train`` does):
  every 5th replay feature of each old class is held back; a head of the old classes alone and
  one with the new classes are fitted without them; the largest bias (0-4 in steps of 0.25) that
  keeps the held-back photos within ``--budget`` of the first head's accuracy is added to the
  new classes of the head fitted on everything (no test photo is used to choose it).

Then, through the device's own ``Learner`` (a temporary store per draw, the defaults): ants +
bees, and each flower class removed from the bundle and learned back from k photos, scored as
nearest class mean, head and ``auto`` (what ``device predict`` answers with), after training and
between 'add' and 'train' (the photos stored, no training yet: ``auto`` is then the head for its
classes and class means for the new ones).

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


def through_learner(bundle: Path, seeds: int, ks: tuple[int, ...] = (1, 5, 10), cfg=None,
                    force: bool = False) -> list[dict]:
    """The device's own path: Learner with a fresh store, k photos per new class stored, trained
    with the defaults, then scored as nearest class mean, head and ``auto`` (what ``device
    predict`` answers with). Scenarios: ants + bees added to the bundle; each bundle class in turn
    removed (``Learner.remove``: its unit and its replay photos are gone) and learned back from
    k of its training photos under a new name. Features are computed once and stored directly.
    ``cfg``: the retrain's HeadTrainConfig (default: the defaults); ``force``: activate a head
    the forgetting check refused (to compare settings on every draw)."""
    import tempfile

    from edgetl.device import Learner

    flowers, hym = SHARED / "datasets/flowers", SHARED / "datasets/hymenoptera"
    with tempfile.TemporaryDirectory(prefix="edgetl-few-shot-") as tmp:
        probe = Learner.open(bundle, store=Path(tmp) / "probe.sqlite", threads=2)
        labels = probe.labels()

        def feats(folder: Path) -> np.ndarray:
            return probe.features(sorted(folder.glob("*.jpg")))[0]

        test = {c: feats(flowers / "test" / c) for c in labels}
        scenarios = [("ants + bees", None, {c: feats(hym / "train" / c) for c in ("ants", "bees")},
                      {c: feats(hym / "val" / c) for c in ("ants", "bees")}, test)]
        for c in labels:
            scenarios.append((f"{c} held out", c, {f"{c} (new)": feats(flowers / "train" / c)},
                              {f"{c} (new)": test[c]}, {o: test[o] for o in labels if o != c}))
        probe.close()
        rows = []
        for name, removed, pools, new_test, old_test in scenarios:
            for k in ks:
                acc: dict[str, list] = {}
                for seed in range(seeds):
                    rng = np.random.default_rng(seed)
                    learner = Learner.open(bundle, store=Path(tmp) / f"{name}-{k}-{seed}.sqlite".replace(" ", "_"),
                                           threads=1)
                    try:
                        if removed:
                            learner.remove(removed)
                        for label, pool in pools.items():
                            pick = rng.choice(len(pool), k, replace=False)
                            learner.store.add(pool[pick], label, [f"{label}-{i}" for i in pick],
                                              [f"{label}-{i}-{seed}" for i in pick])
                        def score(key: str, mode: str, learner=learner, acc=acc, new_test=new_test,
                                  old_test=old_test) -> None:
                            for group, sets in (("new", new_test), ("old", old_test)):
                                xs = np.concatenate(list(sets.values()))
                                truth = [c for c, x in sets.items() for _ in range(len(x))]
                                names, probs = learner.scores(xs, mode)
                                hit = [names[j] == t for j, t in zip(probs.argmax(1), truth)]
                                acc.setdefault(f"{key} {group}", []).append(float(np.mean(hit)))

                        # Between 'add' and 'train': what 'auto' answers then, and class means alone.
                        score("before auto", learner.answer_mode("auto")[0])
                        score("before ncm", "ncm")
                        r = learner.train(cfg, force=force)
                        auto = learner.answer_mode("auto")[0]
                        for key, mode in (("ncm", "ncm"), ("head", "head"), ("auto", auto)):
                            score(key, mode)
                        acc.setdefault("auto is head", []).append(float(auto == "head"))
                        acc.setdefault("bias", []).append((r.get("new_class_bias") or {}).get("bias", 0.0))
                    finally:
                        learner.close()
                rows.append({"scenario": name, "photos_per_class": k, "draws": seeds,
                             **{key: float(np.mean(v)) for key, v in acc.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--learner-only", action="store_true", help="only the device's Learner table")
    ap.add_argument("--ks", default="1,5,10", help="photos per new class in the Learner table")
    ap.add_argument("--subspace-dim", type=int, default=None, help="the retrain's principal directions")
    ap.add_argument("--residual-directions", type=int, default=None, help="the retrain's stored-photo directions")
    ap.add_argument("--force", action="store_true", help="activate heads the forgetting check refused")
    args = ap.parse_args()
    ks = tuple(int(k) for k in args.ks.split(","))
    if args.learner_only:
        learner_only(args, ks)
        return

    from edgetl.bundle import open_bundle
    from edgetl.bundle.selftest import cpu_fingerprint, describe_cpu
    from edgetl.head import HeadTrainConfig, add_classes, ncm_predict, train_head
    from edgetl.head.arrays import head_predict
    from edgetl.head.solver import solve_softmax

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

            layers, _ = train_head(add_classes(head0, x, y, [k_old, k_old + 1]), x, y,
                                   HeadTrainConfig(optimizer="adam"))
            score("former device default (Adam 300 steps, L2 0.3)", head_predict(vx, layers), head_predict(fx, layers))
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
    learner_rows = through_learner(args.bundle, args.seeds, ks, _retrain_config(args), args.force)
    cpu = cpu_fingerprint()
    print(f"{entry['file']} of {args.bundle}; flowers/test with the bundle's head: {base_old:.3f}; "
          f"{args.seeds} draws per k; {describe_cpu(cpu)}")
    print(table(["recipe", "k=1 new", "k=1 old", "k=5 new", "k=5 old", "k=10 new", "k=10 old"], rows))
    print_learner_table(learner_rows, args)
    path = write_json("few_shot", {"bundle": str(args.bundle), "backbone_file": entry["file"],
                                   "old_classes_accuracy_before": base_old, "budget": args.budget, "rows": doc,
                                   "learner": learner_rows})
    print(f"wrote {path}")


def _retrain_config(args):
    from dataclasses import replace

    from edgetl.head.fit import HeadTrainConfig

    cfg = HeadTrainConfig()
    if args.subspace_dim is not None:
        cfg = replace(cfg, subspace_dim=args.subspace_dim)
    if args.residual_directions is not None:
        cfg = replace(cfg, residual_directions=args.residual_directions)
    return cfg


def print_learner_table(learner_rows: list[dict], args) -> None:
    cfg = _retrain_config(args)
    print(f"\nthe device's Learner ({args.seeds} random draws; {cfg.subspace_dim} principal + at most "
          f"{cfg.residual_directions} stored-photo directions{'; refused heads activated' if args.force else ''}), "
          "accuracy on new / old classes:")
    print(table(["scenario", "k", "NCM new", "NCM old", "head new", "head old", "auto new", "auto old",
                 "auto = head", "bias"],
                [[r["scenario"], r["photos_per_class"], *[f"{r[f'{m} {g}']:.3f}" for m in ("ncm", "head", "auto")
                                                          for g in ("new", "old")],
                  f"{r['auto is head']:.2f}", f"{r['bias']:.2f}"] for r in learner_rows]))
    print("\nbetween 'add' and 'train' (the new photos stored, no training yet), accuracy on new / old classes:")
    print(table(["scenario", "k", "NCM new", "NCM old", "auto new", "auto old"],
                [[r["scenario"], r["photos_per_class"], *[f"{r[f'before {m} {g}']:.3f}" for m in ("ncm", "auto")
                                                          for g in ("new", "old")]] for r in learner_rows]))
    for k in sorted({r["photos_per_class"] for r in learner_rows}):
        at_k = [r for r in learner_rows if r["photos_per_class"] == k]
        print(f"k={k}: mean over scenarios, head new {np.mean([r['head new'] for r in at_k]):.3f}, "
              f"head old {np.mean([r['head old'] for r in at_k]):.3f}")


def learner_only(args, ks: tuple[int, ...]) -> None:
    from dataclasses import asdict

    cfg = _retrain_config(args)
    rows = through_learner(args.bundle, args.seeds, ks, cfg, args.force)
    print_learner_table(rows, args)
    path = write_json("few_shot_learner", {"bundle": str(args.bundle), "seeds": args.seeds, "force": args.force,
                                           "config": asdict(cfg), "learner": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
