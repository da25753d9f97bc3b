"""The phone as a device: a static web app that runs a bundle's TFLite backbone with LiteRT.js
(WebAssembly, XNNPACK) and learns the head in the page, offline (``edgetl device web``; the
service serves the same app at ``/phone/``).

:func:`build_app` writes a folder any static host serves: the page (``app/``), the LiteRT.js
runtime (``app/vendor/``, copied from npm's ``@litertjs/core`` by ``js/vendor.mjs``; see
:func:`vendor_dir`), and the bundle's data in plain binary files (``model/``): the backbone with a
static batch of 1 (LiteRT.js compiles no dynamic shapes), the head, the replay features and their
principal directions, and the self-test references.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from ...bundle import Bundle, open_bundle
from ...bundle.selftest import References
from ...errors import BundleError, ConfigError, MissingDependencyError
from ...fileio import atomic_write_bytes, atomic_write_json, commit_dir, make_staging_dir, sha256_file
from ...head.solver import SHIPPED_DIRECTIONS
from ...preprocess import MIN_TRAINING_SIDE

VENDOR_FILES = ("litert.js", "wasm-utils.js", "wasm/litert_wasm_internal.js", "wasm/litert_wasm_internal.wasm",
                "wasm/litert_wasm_threaded_internal.js", "wasm/litert_wasm_threaded_internal.wasm")


def app_dir() -> Path:
    return Path(str(resources.files("edgetl.device.phone") / "app"))


def vendor_dir() -> Path:
    """LiteRT.js as the page loads it. Not in git: ``node js/vendor.mjs`` copies it from the
    npm packages pinned in ``js/package-lock.json`` (``.ci/run`` does, and a wheel built after
    it carries the files, so a Pi without network serves a working app)."""
    return app_dir() / "vendor"


def check_vendor() -> None:
    missing = [f for f in VENDOR_FILES if not (vendor_dir() / f).is_file()]
    if missing:
        raise MissingDependencyError(
            f"the phone app's LiteRT.js files are missing from {vendor_dir()} ({', '.join(missing)}); in a source "
            "checkout run 'cd js && npm ci && node vendor.mjs' (needs Node.js and the npm registry once), or "
            "install a wheel built after that")


def static_batch(flatbuffer: bytes) -> bytes:
    """The TFLite model with every tensor's dynamic batch dimension (-1 in ``shape_signature``)
    made 1, edited in place: the same graph and weights, a shape LiteRT.js can compile."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise MissingDependencyError("making the phone app needs LiteRT (pip install ai-edge-litert)") from None
    buf = bytearray(flatbuffer)
    model = schema.Model.GetRootAs(buf, 0)
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            o = tensor._tab.Offset(18)  # shape_signature (see Tensor.ShapeSignature in the schema)
            if o and tensor.ShapeSignatureLength() and tensor.ShapeSignature(0) == -1:
                at = tensor._tab.Vector(o)
                buf[at : at + 4] = np.int32(1).tobytes()
    return bytes(buf)


def pick_backbone(bundle: Bundle) -> dict:
    """The backbone file the page runs: the bundle's TFLite backbone it prefers (int8 first)."""
    tflite = [e for e in bundle.ranked("backbone") if e["format"] == "tflite"]
    if not tflite:
        have = ", ".join(e["file"] for e in bundle.entries("backbone")) or "none"
        raise BundleError(f"bundle {bundle.source} has no TFLite backbone for the phone (it has: {have}); "
                          "export it with -f tflite:int8")
    entry = tflite[0]
    if entry.get("input", {}).get("dtype", "float32") != "float32":
        raise BundleError(f"{entry['file']} takes {entry['input']['dtype']} input; the phone app runs backbones "
                          "with float input (export int8 without --full-int8)")
    return entry


def _write(folder: Path, name: str, data: bytes, files: dict, **fields) -> None:
    atomic_write_bytes(folder / name, data)
    files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **fields}


def write_model(bundle: Bundle, entry: dict, folder: Path) -> dict:
    """The bundle's data for the page in ``folder``; returns ``meta.json``'s document."""
    files: dict = {}
    _write(folder, "backbone.tflite", static_batch(bundle.path(entry).read_bytes()), files)
    layers = bundle.head(entry)
    _write(folder, "head.f32", b"".join(np.asarray(a, "<f4").tobytes() for w, b in layers for a in (w, b)), files,
           layers=[list(w.shape) for w, _ in layers])
    replay = bundle.replay(entry)
    if replay is not None:
        feats, labels = replay
        _write(folder, "replay.f16", np.asarray(feats, "<f2").tobytes(), files, shape=list(feats.shape))
        _write(folder, "replay_labels.u16", np.asarray(labels, "<u2").tobytes(), files)
        sub, coords = bundle.replay_subspace(entry, SHIPPED_DIRECTIONS)
        _write(folder, "basis.f32", np.asarray(sub.basis, "<f4").tobytes(), files, shape=list(sub.basis.shape))
        _write(folder, "basis_mean.f32", np.asarray(sub.mean, "<f4").tobytes(), files)
        # The replay's coordinates along those directions, as the Python learner computes them: the
        # page's retrain reads them instead of projecting 1,000+ features on every load.
        _write(folder, "replay_coords.f32", np.asarray(coords, "<f4").tobytes(), files, shape=list(coords.shape))
    self_test = None
    if bundle.manifest.get("self_test") and entry.get("self_test"):
        refs = References(bundle.root / bundle.manifest["self_test"]["file"])
        with np.load(bundle.root / bundle.manifest["self_test"]["file"], allow_pickle=False) as z:
            jpeg, offsets = z["jpeg"].tobytes(), z["offsets"].tolist()
        _write(folder, "refs.jpg", jpeg, files, offsets=offsets)
        _write(folder, "ref_features.f32", np.asarray(refs.features, "<f4").tobytes(), files,
               shape=list(refs.features.shape))
        self_test = {"photos": len(refs), **entry["self_test"], "pixels_sha256": refs.pixels_sha256,
                     "verified_on": bundle.manifest["self_test"]["verified_on"]}
    return {
        "format": "edgetl-phone", "format_version": 1, "name": bundle.manifest.get("name"),
        "bundle_sha256": bundle.digest, "labels": bundle.labels, "feature_dim": bundle.feature_dim,
        "preprocessing": bundle.preprocessing.to_dict(), "min_training_side": MIN_TRAINING_SIDE,
        "backbone": bundle.backbone_identity,
        "backbone_file": entry["file"], "backbone_sha256": entry["sha256"], "precision": entry.get("precision"),
        "self_test": self_test, "files": files,
    }


def build_app(bundle: str | Path | Bundle, out: str | Path, force: bool = False) -> dict:
    """Write the phone app for ``bundle`` to ``out`` (replaced atomically with ``force``)."""
    check_vendor()
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    entry = pick_backbone(b)
    target = Path(out)
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to replace it")
    staging = make_staging_dir(target)
    try:
        shutil.copytree(app_dir(), staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        (staging / "model").mkdir()
        meta = write_model(b, entry, staging / "model")
        atomic_write_json(staging / "model" / "meta.json", meta)
        listing = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        digests = {name: sha256_file(staging / name) for name in listing}
        version = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
        atomic_write_json(staging / "files.json", {"version": version, "files": digests})
        commit_dir(staging, target, replace=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return {"app": str(target), "bundle": str(b.source), "backbone_file": entry["file"], "version": version,
            "files": len(listing) + 1, "bytes": size}
