"""The bundle: the contract between the workstation and the device (stdlib + NumPy only).

A bundle is one folder (or a zip of it) holding ``manifest.json`` and the files it lists.
:func:`open_bundle` refuses a bundle whose manifest is malformed, whose format version is
unknown, or whose files are missing or differ by a single byte from their sha256.
See docs/bundle.md for every manifest field.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import BundleError
from .fileio import atomic_write_json, commit_dir, make_staging_dir, sha256_file
from .formats import PREFERENCE
from .head_arrays import Layers, load_head
from .preprocess import Preprocessing

BUNDLE_FORMAT = "edgetl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("classifier", "backbone", "head", "replay", "trainable_head", "labels", "report", "references")


class Bundle:
    def __init__(self, root: Path, manifest: dict, source: Path):
        self.root = root
        self.manifest = manifest
        self.source = source
        self.labels: list[str] = list(manifest["labels"])
        self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.feature_dim: int = int(manifest["feature_dim"])
        self.backbone_identity: dict = manifest["backbone"]

    @property
    def files(self) -> list[dict]:
        return self.manifest["files"]

    @property
    def digest(self) -> str:
        """sha256 of manifest.json: it names every file's sha256, so it identifies the whole bundle."""
        return sha256_file(self.root / MANIFEST)

    def path(self, entry: dict) -> Path:
        return self.root / entry["file"]

    def entries(self, role: str) -> list[dict]:
        return [f for f in self.files if f["role"] == role]

    def pick(self, role: str, backend: str | None = None, precision: str | None = None,
             required: bool = True) -> dict | None:
        """The file of ``role`` to use: filtered by backend/precision, then by device preference."""
        cands = self.entries(role)
        if backend in ("litert", "tflite_runtime"):
            cands = [c for c in cands if c["format"] == "tflite"]
        elif backend == "onnxruntime":
            cands = [c for c in cands if c["format"] == "onnx"]
        if precision:
            cands = [c for c in cands if c.get("precision") == precision]
        if not cands:
            if not required:
                return None
            have = [f"{f['file']} ({f['format']} {f.get('precision')})" for f in self.entries(role)]
            raise BundleError(
                f"bundle {self.source} has no {role} file for backend={backend or 'any'} "
                f"precision={precision or 'any'}; it has: {', '.join(have) or 'none'}"
            )
        rank = {fp: i for i, fp in enumerate(PREFERENCE)}
        return min(cands, key=lambda c: rank.get((c["format"], c.get("precision")), len(rank)))

    def head(self, backbone_entry: dict | None = None) -> Layers:
        """The head; a quantized backbone may carry its own re-fitted head (``backbone_entry['head']``)."""
        if backbone_entry is not None and backbone_entry.get("head"):
            entry = next(f for f in self.files if f["file"] == backbone_entry["head"])
        else:
            entry = next((f for f in self.entries("head") if "backbone" not in f), None) or self.pick("head")
        layers = load_head(self.path(entry))
        if layers[0][0].shape[0] != self.feature_dim or layers[-1][0].shape[1] != len(self.labels):
            raise BundleError(
                f"head {entry['file']} maps {layers[0][0].shape[0]} -> {layers[-1][0].shape[1]}, but the manifest "
                f"says feature_dim {self.feature_dim} and {len(self.labels)} labels"
            )
        return layers

    def replay(self, backbone_entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """Replay features made with this backbone file: (features, labels), or None."""
        name = backbone_entry.get("replay")
        if not name:
            return None
        with np.load(self.root / name, allow_pickle=False) as z:
            return z["features"].astype(np.float32), z["labels"].astype(np.int64)


def _fail(source, msg: str):
    raise BundleError(f"bundle {source}: {msg}")


def read_manifest(root: Path, source: Path) -> dict:
    mpath = root / MANIFEST
    if not mpath.is_file():
        _fail(source, f"no {MANIFEST}; expected a folder or zip written by 'edgetl export'")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        _fail(source, f"{MANIFEST} is not valid JSON ({exc})")
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        _fail(source, f"{MANIFEST} has format {m.get('format') if isinstance(m, dict) else None!r}; expected {BUNDLE_FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        _fail(source, f"format_version {m.get('format_version')!r} is not supported; this edgetl reads {FORMAT_VERSION}")
    for key in ("labels", "preprocessing", "feature_dim", "backbone", "files"):
        if key not in m:
            _fail(source, f"{MANIFEST} misses the field {key!r}")
    if not m["labels"] or not all(isinstance(x, str) for x in m["labels"]):
        _fail(source, f"labels must be a non-empty list of strings; received {m['labels']!r}")
    return m


def verify_files(root: Path, manifest: dict, source: Path) -> None:
    for entry in manifest["files"]:
        name = entry.get("file", "")
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            _fail(source, f"file entry {name!r} is not a plain relative name")
        if entry.get("role") not in ROLES:
            _fail(source, f"{name}: unknown role {entry.get('role')!r}; expected one of {', '.join(ROLES)}")
        p = root / name
        if not p.is_file():
            _fail(source, f"{name} is listed in the manifest but missing")
        size = p.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            _fail(source, f"{name} has {size} bytes; the manifest says {entry['bytes']}")
        digest = sha256_file(p)
        if digest != entry.get("sha256"):
            _fail(source, f"{name} has sha256 {digest[:16]}..., the manifest says {str(entry.get('sha256'))[:16]}...: "
                          "the file was changed or damaged; re-export the bundle")


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle folder or zip and verify its manifest and every file's sha256."""
    source = Path(path)
    if not source.exists():
        raise BundleError(f"bundle {source} does not exist")
    if source.is_file():
        if not zipfile.is_zipfile(source):
            _fail(source, "is a file but not a zip; expected a bundle folder or its .zip")
        root = Path(tempfile.mkdtemp(prefix="edgetl-bundle-"))
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                target = (root / info.filename).resolve()
                if not str(target).startswith(str(root.resolve())):
                    _fail(source, f"zip member {info.filename!r} points outside the bundle")
            zf.extractall(root)
        subdirs = [p for p in root.iterdir() if p.is_dir()]
        if not (root / MANIFEST).exists() and len(subdirs) == 1:
            root = subdirs[0]
    else:
        root = source
    manifest = read_manifest(root, source)
    if verify:
        verify_files(root, manifest, source)
    return Bundle(root, manifest, source)


def file_entry(root: Path, name: str, role: str, **fields) -> dict:
    p = root / name
    return {"file": name, "role": role, **fields, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def commit_bundle(staging: Path, target: Path, manifest: dict, force: bool = False) -> Path:
    """Write the manifest last, then move the finished staging folder into place.

    Until the final rename nothing exists at ``target``: an interrupted export leaves no
    half bundle (only a hidden staging folder, removed by the next export); ``force``
    swaps an existing bundle for the new one atomically (see :func:`edgetl.fileio.commit_dir`).
    """
    atomic_write_json(staging / MANIFEST, manifest)
    os.chmod(staging, 0o755)
    if target.exists() and not force:
        raise BundleError(f"{target} already exists; pass --force to replace it")
    return commit_dir(staging, target, replace=force)


def make_staging(target: Path) -> Path:
    return make_staging_dir(target)


def zip_bundle(folder: Path, zip_path: Path) -> Path:
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            if p.is_file():
                zf.write(p, arcname=f"{folder.name}/{p.name}")
    os.replace(tmp, zip_path)
    return zip_path
