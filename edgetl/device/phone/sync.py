"""The page's state and a Python store, both ways: features and heads, never photos.

The page exports ``{"format": "edgetl-phone-state", ...}`` (edgetl.js ``export()``); the service
takes it at ``POST /api/sync`` and ``edgetl-device import`` from a file. ``GET /api/sync`` gives
the page the Pi's stored features and active head.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np

from ...errors import DataError
from ...labels import check_label
from ..learner import Learner

STATE_FORMAT = "edgetl-phone-state"
MAX_SAMPLES = 10_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode()


def _floats(text, n: int, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise DataError(f"{what}: not base64 float32 data") from None
    if len(raw) != 4 * n:
        raise DataError(f"{what}: {len(raw) // 4} numbers; expected {n}")
    a = np.frombuffer(raw, "<f4").astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{what}: holds NaN or infinite values")
    return a


def state_for_page(learner: Learner) -> dict:
    """What ``GET /api/sync`` gives a page: the active head and every stored feature."""
    head = learner.store.head()
    x, labels, ids = learner.store.samples()
    rows = learner.store.listing(limit=max(len(ids), 1)) if ids else []
    meta = {r["id"]: r for r in rows}
    return {
        "format": STATE_FORMAT, "format_version": 1, "bundle_sha256": learner.bundle.digest,
        "backbone_file": learner.backbone_entry["file"], "backbone_sha256": learner.backbone_entry["sha256"],
        "head": {"version": head.version, "labels": head.labels,
                 "info": {k: v for k, v in head.info.items() if k in ("origin", "temperature", "ncm_check",
                                                                      "new_class_bias", "bundle_names")},
                 "layers": [{"W": _b64(w), "b": _b64(b), "shape": list(w.shape)} for w, b in head.layers]},
        "samples": [{"id": i, "label": lab, "digest": meta.get(i, {}).get("sha256", ""),
                     "source": meta.get(i, {}).get("source", ""), "feature": _b64(f)}
                    for i, lab, f in zip(ids, labels, x)],
    }


def import_state(learner: Learner, doc: dict) -> dict:
    """Store the samples of a page's exported state (features computed by the same backbone
    file); duplicates (same class, same photo) are skipped. Returns what was stored."""
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise DataError(f"expected a page's exported state ({{\"format\": \"{STATE_FORMAT}\", ...}}); received "
                        f"{str(doc.get('format') if isinstance(doc, dict) else type(doc).__name__)!r}")
    entry = learner.backbone_entry
    if doc.get("backbone_sha256") != entry["sha256"]:
        raise DataError(f"the page computed its features with {doc.get('backbone_file')!r} "
                        f"({str(doc.get('backbone_sha256'))[:12]}...), this store with {entry['file']} "
                        f"({entry['sha256'][:12]}...): features of two backbone files cannot be mixed")
    samples = doc.get("samples")
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES:
        raise DataError(f"'samples' must be a list of at most {MAX_SAMPLES}; received "
                        f"{type(samples).__name__}{f' of {len(samples)}' if isinstance(samples, list) else ''}")
    dim = learner.bundle.feature_dim
    by_label: dict[str, tuple[list, list, list]] = {}
    for k, s in enumerate(samples):
        if not isinstance(s, dict):
            raise DataError(f"sample {k}: expected an object with label, digest, feature")
        label = check_label(str(s.get("label", "")), f"sample {k}'s label").strip()
        digest = str(s.get("digest", ""))
        if not _HEX64.match(digest):
            raise DataError(f"sample {k}: digest must be the photo's sha256 (64 hex digits); received {digest[:70]!r}")
        feats, names, digests = by_label.setdefault(label, ([], [], []))
        feats.append(_floats(s.get("feature"), dim, f"sample {k}'s feature"))
        names.append(str(s.get("source") or f"phone-{digest[:12]}")[:200])
        digests.append(digest)
    stored, duplicates = 0, 0
    for label, (feats, names, digests) in by_label.items():
        ids = learner.store.add(np.stack(feats), label, names, digests, skip_duplicates=True)
        stored += sum(i is not None for i in ids)
        duplicates += sum(i is None for i in ids)
    return {"stored": stored, "duplicates": duplicates, "labels": sorted(by_label), "samples": learner.store.counts()}
