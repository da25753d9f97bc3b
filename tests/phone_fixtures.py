"""Fixtures for the page's learner (js/test/*.test.mjs under node --test): what the Python learner
computes on real features, written as plain binary files and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from edgetl.device import HeadTrainConfig, Learner

from .helpers import HYMENOPTERA

ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
BEES = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))


def _f32(path: Path, a) -> None:
    np.ascontiguousarray(a, "<f4").tofile(path)


def write_resize_fixture(out: Path) -> None:
    """Random pixels and Pillow's bilinear resize of them (down and up, odd sizes)."""
    rng = np.random.default_rng(0)
    cases = []
    for i, (w, h, size) in enumerate([(37, 23, 16), (320, 240, 224), (100, 180, 96), (50, 40, 64), (224, 300, 224),
                                      (300, 224, 224), (999, 1000, 224), (60, 200, 96)]):
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        resized = np.asarray(Image.fromarray(px).resize((size, size), Image.Resampling.BILINEAR), np.uint8)
        px.tofile(out / f"resize_{i}_in.u8")
        resized.tofile(out / f"resize_{i}_out.u8")
        cases.append({"w": w, "h": h, "size": size})
    (out / "resize.json").write_text(json.dumps(cases))


def write_learner_fixture(bundle: Path, out: Path, k: int = 10) -> dict:
    """Ants and bees (k photos each) taught to the bundle's int8 TFLite backbone's learner, trained
    with the defaults; the inputs and what Python made of them."""
    learner = Learner.open(bundle, store=out / "store.sqlite", backend="litert", precision="int8", threads=1)
    try:
        learner.add(ANTS[:k], "ants")
        learner.add(BEES[:k], "bees")
        first = learner.store.head()
        r = learner.train(HeadTrainConfig())
        head = learner.store.head(r["version"])
        entry = learner.backbone_entry
        feats, labels = learner.bundle.replay(entry)
        sub, _ = learner.bundle.replay_subspace(entry, 192)
        x, slabels, sids = learner.store.samples()
        probe, _, _, _ = learner.features(ANTS[k : k + 6] + BEES[k : k + 6])
        probs = learner.scores(probe, "head")[1]
        ncm_labels, ncm = learner.scores(probe, "ncm")
        mixed_labels, mixed = learner.scores(probe, "head+ncm", version=first.version)  # before 'train'
        _f32(out / "replay.f32", feats)
        np.asarray(labels, "<i4").tofile(out / "replay_labels.i32")
        _f32(out / "basis.f32", sub.basis)
        _f32(out / "basis_mean.f32", sub.mean)
        _f32(out / "stored.f32", x)
        (w1, b1), = first.layers
        _f32(out / "head1.f32", np.concatenate([w1.ravel(), b1]))
        (w, b), = head.layers
        _f32(out / "result_head.f32", np.concatenate([w.ravel(), b]))
        _f32(out / "probe.f32", probe)
        _f32(out / "probe_probs.f32", probs)
        _f32(out / "probe_ncm.f32", ncm)
        _f32(out / "probe_mixed.f32", mixed)
        doc = {"bundle_labels": learner.bundle.labels, "feature_dim": learner.bundle.feature_dim,
               "digest": learner.bundle.digest, "samples": [{"id": i, "label": s} for i, s in zip(sids, slabels)],
               "head1": {"version": first.version, "labels": first.labels, "info": first.info},
               "result": {"labels": r["labels"], "new_class_bias": r.get("new_class_bias"),
                          "temperature": r.get("temperature"), "ncm_check": r.get("ncm_check"),
                          "solver": r.get("solver"), "activated": r["activated"]},
               "probe_count": int(len(probe)), "ncm_labels": ncm_labels,
               "mixed_labels": mixed_labels}
        (out / "learner.json").write_text(json.dumps(doc))
        return doc
    finally:
        learner.close()


if __name__ == "__main__":  # python -m tests.phone_fixtures BUNDLE OUT
    target = Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    write_resize_fixture(target)
    print(json.dumps(write_learner_fixture(Path(sys.argv[1]), target)["result"], indent=1))
