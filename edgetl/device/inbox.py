"""The inbox loop used by device_scripts/personalize.py.

Layout::

    inbox/<label>/*.jpg        photos to learn (a new label makes a new class)
    inbox/unlabelled/*.jpg     photos to classify
    inbox/.done/...            processed photos are moved here (same sub-folder)
    inbox/.rejected/...        unreadable photos, with the reason in rejected.jsonl
    predictions.jsonl          one line per classified photo (the predict --json entry + time)

A photo is moved out of the inbox only after its sample is committed (or its prediction
written), so a crash at any moment repeats work at worst: a re-added photo is recognised by
its sha256 and not stored twice. Photos of one label are added up to 16 per call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..data import is_image_file
from ..head.fit import HeadTrainConfig
from .learner import Learner

log = logging.getLogger("edgetl")
UNLABELLED = "unlabelled"
ADD_BATCH = 16  # photos per add call at most


def _move(src: Path, inbox: Path, bucket: str) -> None:
    dst = inbox / bucket / src.relative_to(inbox)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():  # the same photo was processed before a crash: keep one copy
        src.unlink()
    else:
        os.replace(src, dst)


def _append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def process_inbox(learner: Learner, inbox: Path, predictions: Path, retrain_every: int = 10,
                  pending: int = 0, train_config: HeadTrainConfig | None = None) -> dict:
    """One pass over the inbox. Returns counts and the number of samples not yet trained on."""
    inbox = Path(inbox)
    learned = classified = rejected = trained = 0
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))
        if not files:
            continue
        if folder.name == UNLABELLED:
            result = learner.predict(files)
            for f, pred in zip(files, result["predictions"]):
                if "error" in pred:
                    _reject(inbox, f, pred["error"])
                    rejected += 1
                    continue
                _append_jsonl(predictions, {**pred, "time": time.time(), "head_version": result["head_version"]})
                _move(f, inbox, ".done")
                classified += 1
            continue
        i = 0
        while i < len(files):
            # Several photos per call (decoding overlaps the backbone), cut so that a retrain still
            # comes after every ``retrain_every`` new samples. A photo is moved only after the call
            # committed it; after a crash in between it is added again and skipped as a duplicate.
            n = ADD_BATCH if retrain_every < 1 else max(1, min(ADD_BATCH, retrain_every - pending))
            group, i = files[i : i + n], i + n
            r = learner.add(group, folder.name)
            bad = {e["file"]: e["error"] for e in r["errors"]}
            for f in group:
                if str(f) in bad:
                    _reject(inbox, f, bad[str(f)])
                    rejected += 1
                else:
                    _move(f, inbox, ".done")
            learned += r["stored"]
            pending += r["stored"]
            if retrain_every >= 1 and pending >= retrain_every:
                learner.train(train_config)
                trained += 1
                pending = 0
    return {"learned": learned, "classified": classified, "rejected": rejected, "retrained": trained,
            "pending": pending}


def _reject(inbox: Path, f: Path, reason: str) -> None:
    log.warning("rejected %s", reason)
    folder = inbox / ".rejected"
    folder.mkdir(parents=True, exist_ok=True)
    _append_jsonl(folder / "rejected.jsonl", {"file": str(f.relative_to(inbox)), "reason": reason, "time": time.time()})
    _move(f, inbox, ".rejected")


def ensure_layout(inbox: Path) -> None:
    (Path(inbox) / UNLABELLED).mkdir(parents=True, exist_ok=True)


def copy_to_inbox(src: Path, inbox: Path, label: str | None) -> Path:
    """Drop a photo into the inbox atomically (write a hidden temp, then rename)."""
    folder = Path(inbox) / (label or UNLABELLED)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    dst = folder / src.name
    os.replace(tmp, dst)
    return dst
