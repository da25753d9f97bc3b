"""The bundle: the contract between the workstation and the device (stdlib + NumPy only).

A bundle is one folder (or a zip of it) holding ``manifest.json`` and the files it lists.
:func:`open_bundle` refuses a bundle whose manifest is malformed, whose format version is
unknown, or whose files are missing or differ by a single byte from their sha256.
See docs/bundle.md for every manifest field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np

from ..errors import BundleError, DataError
from ..fileio import sha256_file
from ..formats import FILE_ROLES, PREFERENCE, runs_format
from ..head.arrays import Layers, load_head, sum_by_class
from ..head.solver import Subspace
from ..labels import check_label
from ..preprocess import Preprocessing
from ..runtime import open_model

log = logging.getLogger("edgetl")

BUNDLE_FORMAT = "edgetl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROLES = (*FILE_ROLES, "head", "replay", "labels", "report", "references")  # model files, then data files
DIGEST_FIELD = "manifest_sha256"
# Zip bundles are extracted (to a private temp folder removed when the bundle is closed or
# collected) only within these bounds, checked on the zip's directory before a byte is written.
MAX_MANIFEST_BYTES = 4 << 20
ZIP_MAX_MEMBERS = 256
ZIP_MAX_BYTES = int(os.environ.get("EDGETL_ZIP_MAX_BYTES", 2 << 30))  # uncompressed total
ZIP_MAX_RATIO = 100  # uncompressed / compressed, per member (models compress about 1.1x)


class Bundle:
    def __init__(self, root: Path, manifest: dict, source: Path, cleanup: Path | None = None):
        self.root = root
        self.manifest = manifest
        self.source = source
        # A zip's extracted copy goes when the bundle is closed, collected, or at exit.
        self._finalizer = weakref.finalize(self, shutil.rmtree, cleanup, True) if cleanup else None
        self.labels: list[str] = list(manifest["labels"])
        self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.feature_dim: int = int(manifest["feature_dim"])
        self.backbone_identity: dict = manifest["backbone"]
        self._replay: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # read once per file (read-only arrays)
        self._subspace: dict[tuple[str, int], tuple] = {}
        self._class_sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._shipped_basis: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # replay file -> (mean, basis)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def ranked(self, role: str) -> list[dict]:
        """The files of ``role``, in the device's order of preference (formats.PREFERENCE)."""
        rank = {fp: i for i, fp in enumerate(PREFERENCE)}
        return sorted(self.entries(role), key=lambda c: rank.get((c["format"], c.get("precision")), len(rank)))

    def pick(self, role: str, backend: str | None = None, precision: str | None = None,
             required: bool = True) -> dict | None:
        """The file of ``role`` to use: filtered by backend/precision, then by device preference."""
        cands = [c for c in self.ranked(role) if runs_format(backend, c["format"])]
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
        return cands[0]

    def _head_entry(self, backbone_entry: dict | None) -> dict:
        if backbone_entry is not None and backbone_entry.get("head"):
            return self._entry(backbone_entry["head"], "head")
        return next((f for f in self.entries("head") if "backbone" not in f), None) or self.pick("head")

    def temperature(self, backbone_entry: dict | None = None) -> float | None:
        """The temperature that calibrates the head's scores (a personalized bundle's, fitted on
        the device's held-back photos), or None."""
        t = self._head_entry(backbone_entry).get("temperature")
        return float(t) if isinstance(t, (int, float)) and 0.01 <= t <= 100 else None

    def head(self, backbone_entry: dict | None = None) -> Layers:
        """The head; a quantized backbone may carry its own re-fitted head (``backbone_entry['head']``)."""
        entry = self._head_entry(backbone_entry)
        layers = load_head(self.path(entry))
        if layers[0][0].shape[0] != self.feature_dim or layers[-1][0].shape[1] != len(self.labels):
            raise BundleError(
                f"head {entry['file']} maps {layers[0][0].shape[0]} -> {layers[-1][0].shape[1]}, but the manifest "
                f"says feature_dim {self.feature_dim} and {len(self.labels)} labels"
            )
        return layers

    def replay(self, backbone_entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """Replay features made with this backbone file: (features, labels), or None. Read from
        the bundle once; the arrays are read-only (every training and class mean uses them)."""
        name = backbone_entry.get("replay")
        if not name:
            return None
        if name not in self._replay:
            feats, labels = self._read_replay(name)
            feats.flags.writeable = labels.flags.writeable = False
            self._replay[name] = (feats, labels)
        return self._replay[name]

    def replay_class_sums(self, backbone_entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """Per bundle class, the sum of its replay features (float64, one row per label) and
        their count, or None without replay features; computed once per bundle (a retrain's
        class means and mean feature need them, without another pass over the replay)."""
        replay = self.replay(backbone_entry)
        if replay is None:
            return None
        name = backbone_entry["replay"]
        if name not in self._class_sums:
            feats, labels = replay
            sums = sum_by_class(feats, labels, len(self.labels))
            counts = np.bincount(labels, minlength=len(self.labels))
            sums.flags.writeable = counts.flags.writeable = False
            self._class_sums[name] = (sums, counts)
        return self._class_sums[name]

    def replay_subspace(self, backbone_entry: dict, dim: int):
        """The replay features' mean and ``dim`` leading principal directions
        (:class:`edgetl.head.solver.Subspace`) and the replay features' coordinates in it, or None
        without replay features. The exporter ships the directions in the replay file; for a
        bundle without them they are computed here (once per bundle and size)."""

        replay = self.replay(backbone_entry)
        if replay is None:
            return None
        name = backbone_entry["replay"]
        if (name, dim) not in self._subspace:
            shipped = self._shipped_basis.get(name)
            sub = None
            if shipped is not None and shipped[1].ndim == 2 and shipped[1].shape[0] >= dim \
                    and shipped[1].shape[1] == self.feature_dim and shipped[0].shape == (self.feature_dim,):
                mean, basis = shipped[0].astype(np.float32), np.ascontiguousarray(shipped[1][:dim], np.float32)
                # Used only if it is what the solver assumes: finite, orthonormal rows.
                if np.isfinite(mean).all() and np.isfinite(basis).all() and \
                        np.abs(basis @ basis.T - np.eye(len(basis), dtype=np.float32)).max() < 1e-3:
                    sub = Subspace(mean, basis)
                else:
                    log.warning("bundle %s: replay file %s ships principal directions that are not finite and "
                                "orthonormal; computing them from its features", self.source, name)
            if sub is None:
                sub = Subspace.principal(replay[0], dim)
            coords = sub.project(replay[0])
            coords.flags.writeable = False
            self._subspace[(name, dim)] = (sub, coords)
        return self._subspace[(name, dim)]

    def _read_replay(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels; the principal directions the exporter ships beside them, if any,
        are kept for replay_subspace (the file is read once)."""
        entry = self._entry(name, "replay")
        try:
            with np.load(self.path(entry), allow_pickle=False) as z:
                feats, labels = z["features"].astype(np.float32), z["labels"].astype(np.int64)
                if "basis" in z.files and "basis_mean" in z.files:
                    self._shipped_basis[name] = (z["basis_mean"], z["basis"])
        except (ValueError, KeyError, OSError) as exc:
            raise BundleError(f"bundle {self.source}: replay file {name} is not a features/labels npz ({exc})") from None
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim or len(labels) != len(feats):
            raise BundleError(f"bundle {self.source}: replay file {name} holds features {feats.shape} and "
                              f"{len(labels)} labels; expected (N, {self.feature_dim}) and N labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.labels)):
            raise BundleError(f"bundle {self.source}: replay file {name} has labels outside 0..{len(self.labels) - 1}")
        return feats, labels

    def open_model(self, entry: dict, threads: int | None = None, backend: str | None = None):
        """Open a backbone or classifier file in its runtime and check its tensors against the
        manifest (input size, feature_dim, number of labels): a file that doesn't fit is refused
        here, with both shapes, instead of failing later inside a computation."""

        runner = open_model(self.path(entry), threads=threads, backend=backend)
        want = {"backbone": self.feature_dim, "classifier": len(self.labels)}.get(entry["role"])
        out = runner.output.shape[-1] if runner.output.shape else None
        if want is not None and out not in (None, -1) and int(out) != want:
            what = "feature_dim" if entry["role"] == "backbone" else "number of labels"
            raise BundleError(f"bundle {self.source}: {entry['file']} outputs {int(out)} values per image; the "
                              f"manifest's {what} is {want}: the file does not belong to this bundle")
        size = runner.input_size
        if size is not None and size != self.preprocessing.size:
            raise BundleError(f"bundle {self.source}: {entry['file']} takes {size}x{size} images; the manifest's "
                              f"preprocessing says {self.preprocessing.size}")
        return runner

    def _entry(self, name: str, role: str) -> dict:
        """The verified file entry ``name`` of ``role`` (open_bundle checked that it exists)."""
        entry = next((f for f in self.files if f["file"] == name and f["role"] == role), None)
        if entry is None:
            raise BundleError(f"bundle {self.source}: the manifest refers to {name!r} as a {role} file, "
                              f"but lists no such {role} file")
        return entry


def _fail(source, msg: str):
    raise BundleError(f"bundle {source}: {msg}")


def read_manifest(root: Path, source: Path) -> dict:
    mpath = root / MANIFEST
    if not mpath.is_file():
        _fail(source, f"no {MANIFEST}; expected a folder or zip written by 'edgetl export'")
    if mpath.is_symlink():
        _fail(source, f"{MANIFEST} is a symbolic link; a bundle's files must be plain files inside it")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:  # refused before it is parsed
        _fail(source, f"{MANIFEST} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys,
                       parse_constant=_no_constant)
    except (ValueError, OSError, RecursionError) as exc:
        _fail(source, f"{MANIFEST} is not valid JSON ({str(exc)[:200] or type(exc).__name__})")
    if isinstance(m, dict) and not isinstance(m.get("files", []), list):
        _fail(source, f"{MANIFEST}: files must be a list of objects; received {type(m['files']).__name__}")
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        _fail(source, f"{MANIFEST} has format {m.get('format') if isinstance(m, dict) else None!r}; expected {BUNDLE_FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        _fail(source, f"format_version {m.get('format_version')!r} is not supported; this edgetl reads {FORMAT_VERSION}")
    for key in ("labels", "preprocessing", "feature_dim", "backbone", "files"):
        if key not in m:
            _fail(source, f"{MANIFEST} misses the field {key!r}")
    if not isinstance(m["labels"], list) or not m["labels"]:
        _fail(source, f"labels must be a non-empty list of strings; received {m['labels']!r}")
    for label in m["labels"]:
        try:
            check_label(label, f"{MANIFEST} labels")
        except DataError as exc:
            _fail(source, str(exc))
    return m


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"the key(s) {twice} appear twice in one object")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), its own digest field left out."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def verify_manifest(root: Path, manifest: dict, source: Path) -> None:
    """The manifest's own digest, and every file name it refers to is a verified entry of the right role."""
    want = manifest.get(DIGEST_FIELD)
    if not want:
        _fail(source, f"{MANIFEST} carries no {DIGEST_FIELD}; bundles from edgetl before 0.2 are not "
                      "accepted; re-export it with 'edgetl export'")
    got = manifest_digest(manifest)
    if got != want:
        _fail(source, f"{MANIFEST} was changed after export: its content hashes to {got[:16]}..., its "
                      f"{DIGEST_FIELD} says {str(want)[:16]}...; re-export the bundle")
    files = manifest["files"]
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        _fail(source, f"{MANIFEST}: files must be a list of objects")
    names = [e.get("file") for e in files]
    if len(names) != len(set(names)):
        _fail(source, f"{MANIFEST} lists a file twice: {sorted({n for n in names if names.count(n) > 1})}")
    roles = {e.get("file"): e.get("role") for e in files}
    refs = [(e.get("file"), key, e[key], role) for e in files
            for key, role in (("replay", "replay"), ("head", "head")) if key in e]
    st = manifest.get("self_test")
    if isinstance(st, dict) and "file" in st:
        refs.append((MANIFEST, "self_test.file", st["file"], "references"))
    for owner, key, name, role in refs:
        if not isinstance(name, str) or roles.get(name) != role:
            _fail(source, f"{owner}: {key} {name!r} is not one of the bundle's verified {role} files "
                          f"({', '.join(n for n, r in roles.items() if r == role) or 'none'})")
    for name in [n for n, r in roles.items() if r == "labels"]:
        p = root / name
        if p.is_file():
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            if lines != list(manifest["labels"]):
                _fail(source, f"the manifest's labels {manifest['labels']} differ from {name} {lines}")


def verify_files(root: Path, manifest: dict, source: Path) -> None:
    for entry in manifest["files"]:
        name = entry.get("file", "")
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            _fail(source, f"file entry {name!r} is not a plain relative name")
        if entry.get("role") not in ROLES:
            _fail(source, f"{name}: unknown role {entry.get('role')!r}; expected one of {', '.join(ROLES)}")
        p = root / name
        # Refused before a byte of it is read: a link (or a name) that leads out of the bundle.
        if any((root / Path(*Path(name).parts[: i + 1])).is_symlink() for i in range(len(Path(name).parts))):
            _fail(source, f"{name} is a symbolic link; a bundle's files must be plain files inside it")
        if not p.resolve().is_relative_to(root.resolve()):
            _fail(source, f"{name} resolves to a path outside the bundle")
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
    cleanup = None
    if source.is_file():
        if not zipfile.is_zipfile(source):
            _fail(source, "is a file but not a zip; expected a bundle folder or its .zip")
        cleanup = Path(tempfile.mkdtemp(prefix="edgetl-bundle-"))
        try:
            root = _extract_zip(source, cleanup)
        except BaseException:
            shutil.rmtree(cleanup, ignore_errors=True)
            raise
    else:
        root = source
    try:
        manifest = read_manifest(root, source)
        if verify:
            verify_files(root, manifest, source)
            verify_manifest(root, manifest, source)
        return Bundle(root, manifest, source, cleanup)
    except BaseException:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise


def _extract_zip(source: Path, into: Path) -> Path:
    """Extract a zip bundle into ``into`` within bounds (members, total size, ratio); the root."""
    try:
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
            if len(infos) > ZIP_MAX_MEMBERS:
                _fail(source, f"the zip has {len(infos)} members; a bundle has at most {ZIP_MAX_MEMBERS}")
            total = sum(i.file_size for i in infos)
            if total > ZIP_MAX_BYTES:
                _fail(source, f"the zip would unpack to {total / 1e6:.0f} MB; at most {ZIP_MAX_BYTES / 1e6:.0f} MB "
                              "is accepted (EDGETL_ZIP_MAX_BYTES)")
            base = into.resolve()
            for info in infos:
                target = (into / info.filename).resolve()
                if target != base and base not in target.parents:
                    _fail(source, f"zip member {info.filename!r} points outside the bundle")
                if info.file_size > 1 << 20 and info.file_size > ZIP_MAX_RATIO * max(info.compress_size, 1):
                    _fail(source, f"zip member {info.filename!r} unpacks {info.compress_size} bytes to "
                                  f"{info.file_size} (more than {ZIP_MAX_RATIO}x): refused as a zip bomb")
            for info in infos:  # sizes are re-checked while reading: the directory can lie
                target = into / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    written = 0
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > info.file_size:
                            _fail(source, f"zip member {info.filename!r} unpacks to more than its stated "
                                          f"{info.file_size} bytes")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        _fail(source, f"the zip cannot be read ({exc})")
    subdirs = [p for p in into.iterdir() if p.is_dir()]
    if not (into / MANIFEST).exists() and len(subdirs) == 1:
        return subdirs[0]
    return into
