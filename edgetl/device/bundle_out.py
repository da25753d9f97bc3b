"""``edgetl device export``: the personalized head back out as a normal bundle (no TensorFlow).

What Teachable Machine calls "download model": the device's active head, its labels, and the
replay features (the bundle's own plus every stored sample) go into a new bundle beside the
backbone file they were computed with. ``edgetl eval/predict`` and another device open it like
any exported bundle.

Kept: the store's backbone file, the self-test references (the new bundle checks itself on each
CPU) and the head's calibration (its temperature: the same scores through ``edgetl predict``).
Left out, and said so in the result: classifier files and the other backbone files (their heads
are the workstation's, not this device's), and the trainable head (its output slots belong to
the workstation's labels).
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..bundle import BundleWriter, head_file_for, replay_file_for
from ..bundle.selftest import References, cpu_fingerprint, measure, thresholds
from ..formats import FILE_ROLES


def export_personalized(learner, out: str | Path, force: bool = False) -> dict:
    head = learner.store.head()
    labels = list(head.labels)
    entry = learner.backbone_entry
    ts = learner.training_set(labels)
    x = ts.full()
    src = learner.bundle.manifest
    # The export-time verification describes the workstation head, which this bundle does not carry.
    keep = {k: v for k, v in entry.items() if k not in ("file", "role", "bytes", "sha256", "head", "replay",
                                                           "head_refit", "verification", "self_test")}
    temperature = (head.info.get("temperature") or {}).get("value")
    extra = {}
    with BundleWriter(out, force=force) as w:
        if src.get("self_test") and entry.get("self_test"):
            # The references travel, so the new bundle checks itself on each CPU as the source
            # did: the features' cosine thresholds are the export's; the agreement one is
            # measured here with this head (it decides the labels the agreement counts).
            refs_name = src["self_test"]["file"]
            w.copy(learner.bundle.root / refs_name, refs_name, "references", format="npz")
            measured = measure(learner.runner, References(learner.bundle.root / refs_name), learner.bundle.preprocessing,
                               "backbone", head.layers)
            keep["self_test"] = {**entry["self_test"], "agreement": measured["agreement"],
                                 "min_agreement": thresholds(measured, measured["photos"])["min_agreement"],
                                 "agreement_measured_on": cpu_fingerprint()}
            extra["self_test"] = dict(src["self_test"])
        w.copy(learner.bundle.path(entry), entry["file"], "backbone", **keep, head=head_file_for(entry["file"]),
               replay=replay_file_for(entry["file"]))
        w.write_head(head.layers, temperature=temperature)
        w.write_head(head.layers, backbone=entry["file"], temperature=temperature)
        w.write_replay(entry["file"], x, ts.y)
        w.write_labels(labels)
        w.commit(labels, learner.bundle.preprocessing, src["feature_dim"], src["backbone"],
                 {**src.get("tools", {}), "edgetl": __version__}, input=src.get("input"),
                 personalized={"from_bundle": src.get("name"), "head_version": head.version,
                               "stored_samples": ts.counts["stored"], "replay_samples": ts.counts["replay"],
                               "temperature": temperature}, **extra)
    left_out = [f["file"] for f in learner.bundle.files
                if f["role"] in FILE_ROLES and f["file"] != entry["file"]]
    return {"bundle": str(w.target), "labels": labels, "backbone_file": entry["file"], "head_version": head.version,
            "replay_samples": int(len(x)), **ts.counts, "left_out": left_out}
