"""The one bundle writer, used by the exporter (workstation) and by ``edgetl device export``.

Files are written into a hidden staging folder beside the target, each registered with its
manifest entry; :meth:`BundleWriter.commit` hashes them, writes the manifest last and moves the
folder into place in one rename, so an interrupted write leaves no half bundle.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, commit_dir, make_staging_dir, sha256_file
from ..head.arrays import Layers, save_head
from ..head.solver import SHIPPED_DIRECTIONS, Subspace
from ..preprocess import Preprocessing
from .reader import BUNDLE_FORMAT, DIGEST_FIELD, FORMAT_VERSION, MANIFEST, manifest_digest

HEAD_FILE = "head.npz"
LABELS_FILE = "labels.txt"


def head_file_for(backbone_file: str) -> str:
    """The name of the head re-fitted for one backbone file."""
    return f"head_{backbone_file.replace('.', '_')}.npz"


def replay_file_for(backbone_file: str) -> str:
    """The name of the replay features computed with one backbone file."""
    return f"replay_{backbone_file.replace('.', '_')}.npz"


def head_fields(layers: Layers) -> dict:
    """A head entry's description of its layers."""
    return {"layers": [list(w.shape) for w, _ in layers], "activation": "relu", "output": "softmax"}


class BundleWriter:
    """Stage a bundle's files, then :meth:`commit` it. Use as a context manager: leaving the block
    without a commit (an error, Ctrl-C) removes the staging folder."""

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        if self.target.exists() and not force:
            raise BundleError(f"{self.target} already exists; pass --force to replace it")
        self.staging = make_staging_dir(self.target)
        self._files: list[tuple[str, str, dict]] = []  # (file, role, entry fields), in manifest order
        self.committed = False
        self.manifest: dict | None = None  # once committed

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.staging / name

    def add(self, name: str, role: str, **fields) -> str:
        """Register a file already written to :meth:`path` ``(name)``."""
        if not self.path(name).is_file():
            raise BundleError(f"bundle file {name} was registered but not written")
        self._files.append((name, role, fields))
        return name

    def copy(self, source: str | Path, name: str, role: str, **fields) -> str:
        shutil.copy2(source, self.path(name))
        return self.add(name, role, **fields)

    def write_head(self, layers: Layers, backbone: str | None = None, temperature: float | None = None) -> str:
        """``head.npz``, or with ``backbone`` the head re-fitted for that backbone file;
        ``temperature``: what calibrates its scores (a device's training fits one)."""
        name = HEAD_FILE if backbone is None else head_file_for(backbone)
        save_head(self.path(name), layers)
        extra = {} if backbone is None else {"backbone": backbone}
        if temperature is not None:
            extra["temperature"] = float(temperature)
        return self.add(name, "head", format="npz", **extra, **head_fields(layers))

    def write_replay(self, backbone_file: str, features: np.ndarray, labels: np.ndarray) -> str:
        """Replay features made with ``backbone_file`` (float16 on disk, grouped by class), with
        their mean and leading principal directions: the subspace a device retrain solves in,
        computed once here instead of on every device."""

        name = replay_file_for(backbone_file)
        order = np.argsort(labels, kind="stable")
        feats = np.asarray(features)[order].astype(np.float16)
        sub = Subspace.principal(feats.astype(np.float32), SHIPPED_DIRECTIONS)  # of the features as a device reads them
        buf = io.BytesIO()
        np.savez(buf, features=feats, labels=np.asarray(labels)[order].astype(np.int64), basis_mean=sub.mean,
                 basis=sub.basis)
        atomic_write_bytes(self.path(name), buf.getvalue())
        return self.add(name, "replay", format="npz", backbone=backbone_file)

    def write_labels(self, labels: list[str]) -> str:
        atomic_write_text(self.path(LABELS_FILE), "\n".join(labels) + "\n")
        return self.add(LABELS_FILE, "labels", format="text")

    def entries(self) -> list[dict]:
        return [{"file": n, "role": r, **f, "bytes": self.path(n).stat().st_size, "sha256": sha256_file(self.path(n))}
                for n, r, f in self._files]

    def commit(self, labels: list[str], preprocessing: Preprocessing, feature_dim: int, backbone: dict, tools: dict,
               input: dict | None = None, **extra) -> dict:
        """Write the manifest (the keys every bundle has, then ``extra``) and move the bundle into
        place (``force``: swapping an existing one atomically). Returns the manifest."""
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "name": self.target.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "labels": list(labels), "preprocessing": preprocessing.to_dict(),
            "input": input or {"size": preprocessing.size, "layout": "NHWC", "channels": 3,
                               "color": preprocessing.channel_order},
            "feature_dim": int(feature_dim), "backbone": backbone, "files": self.entries(), "tools": tools, **extra,
        }
        manifest = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
        atomic_write_json(self.path(MANIFEST), manifest)
        os.chmod(self.staging, 0o755)
        if self.target.exists() and not self.force:
            raise BundleError(f"{self.target} already exists; pass --force to replace it")
        commit_dir(self.staging, self.target, replace=self.force)
        self.committed = True
        self.manifest = manifest
        return manifest


def zip_bundle(folder: Path, zip_path: Path) -> Path:
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            if p.is_file():
                zf.write(p, arcname=f"{folder.name}/{p.name}")
    os.replace(tmp, zip_path)
    return zip_path
