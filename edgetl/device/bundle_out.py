"""``edgetl device export``: the personalized head back out as a normal bundle (no TensorFlow).

What Teachable Machine calls "download model": the device's active head, its labels, and the
replay features (the bundle's own plus every stored sample) go into a new bundle beside the
backbone file they were computed with. ``edgetl eval/predict`` and another device open it like
any exported bundle.

Kept: the store's backbone file. Left out, and said so in the result: classifier files and the
other backbone files (their heads are the workstation's, not this device's), and the trainable
head (its output slots belong to the workstation's labels).
"""

from __future__ import annotations

import io
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..bundle import BUNDLE_FORMAT, FORMAT_VERSION, commit_bundle, file_entry, make_staging
from ..errors import BundleError
from ..fileio import atomic_write_bytes, atomic_write_text
from ..formats import FILE_ROLES
from ..head_arrays import save_head


def export_personalized(learner, out: str | Path, force: bool = False) -> dict:
    target = Path(out)
    if target.exists() and not force:
        raise BundleError(f"{target} already exists; pass --force to replace it")
    head = learner.store.head()
    labels = list(head.labels)
    entry = learner.backbone_entry
    x, y, counts = learner._training_set(labels)
    staging = make_staging(target)
    try:
        shutil.copy2(learner.bundle.path(entry), staging / entry["file"])
        base = entry["file"].replace(".", "_")
        head_name, replay_name = f"head_{base}.npz", f"replay_{base}.npz"
        save_head(staging / head_name, head.layers)
        save_head(staging / "head.npz", head.layers)
        buf = io.BytesIO()
        np.savez(buf, features=x.astype(np.float16), labels=y.astype(np.int64))
        atomic_write_bytes(staging / replay_name, buf.getvalue())
        atomic_write_text(staging / "labels.txt", "\n".join(labels) + "\n")
        # The export-time records (verification, self-test thresholds) describe the workstation
        # head and the source bundle's references, which this bundle does not carry.
        keep = {k: v for k, v in entry.items() if k not in ("file", "role", "bytes", "sha256", "head", "replay",
                                                               "head_refit", "verification", "self_test")}
        shapes = [list(w.shape) for w, _ in head.layers]
        files = [
            file_entry(staging, entry["file"], "backbone", **keep, head=head_name, replay=replay_name),
            file_entry(staging, "head.npz", "head", format="npz", layers=shapes, activation="relu", output="softmax"),
            file_entry(staging, head_name, "head", format="npz", backbone=entry["file"], layers=shapes,
                       activation="relu", output="softmax"),
            file_entry(staging, replay_name, "replay", format="npz", backbone=entry["file"]),
            file_entry(staging, "labels.txt", "labels", format="text"),
        ]
        src = learner.bundle.manifest
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "name": target.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "labels": labels, "preprocessing": src["preprocessing"], "input": src.get("input"),
            "feature_dim": src["feature_dim"], "backbone": src["backbone"], "files": files,
            "tools": {**src.get("tools", {}), "edgetl": __version__},
            "personalized": {"from_bundle": src.get("name"), "head_version": head.version,
                             "stored_samples": counts["stored"], "replay_samples": counts["replay"]},
        }
        commit_bundle(staging, target, manifest, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    left_out = [f["file"] for f in learner.bundle.files
                if f["role"] in FILE_ROLES and f["file"] != entry["file"]]
    return {"bundle": str(target), "labels": labels, "backbone_file": entry["file"], "head_version": head.version,
            "replay_samples": int(len(x)), **counts, "left_out": left_out}
