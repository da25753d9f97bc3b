"""A bundle that checks itself on every CPU it lands on (stdlib + NumPy + Pillow).

The exporter puts ``references.npz`` into the bundle: a few validation photos, already resized
to the model's input and stored as JPEG (a few hundred KB for 24 photos), the sha256 of their
decoded pixels, and the float Keras model's features and probabilities on exactly those pixels.
It runs every exported file on them (on the export machine) and records, per file, what it
measured and the thresholds a device must meet, plus the export CPU's fingerprint.

On a device, :func:`check_entry` runs a file on the same pixels and compares: the cosine of its
outputs to the float model's (features for a backbone, probabilities for a classifier) and the
top-1 agreement (a backbone through the head the device uses with it). The int8 kernels differ
by CPU (AVX-512 VNNI, AVX2, NEON with or without dot product), so a file verified on one CPU
can drift on another; this is how a device finds out before it learns anything with it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import platform
from pathlib import Path

import numpy as np

from .. import package_versions
from ..errors import BundleError
from ..head.arrays import Layers, head_predict
from ..metrics import cosine
from ..preprocess import decode_image

REFERENCES = "references.npz"
REFERENCE_PHOTOS = 24
JPEG_QUALITY = 92
# A device may be this much below what the export machine measured on the same pixels.
COSINE_MARGIN = 0.02
AGREEMENT_MARGIN_PHOTOS = 2
# CPU features that choose different int8 kernels (x86: VNNI vs AVX2; ARM: dot product, i8mm).
KERNEL_FLAGS = ("avx2", "fma3", "f16c", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "avx512fp16", "avx512bf16",
                "amx_int8", "neon", "asimd", "asimdhp", "asimddp", "asimdfhm", "i8mm", "sve", "sve2", "fphp")


def _cpuid_flags() -> list[str] | None:
    """The CPU features NumPy's dispatcher detected (CPUID on x86, HWCAP on ARM): what the
    kernels of this process really see, also under ``qemu -cpu MODEL``, where /proc/cpuinfo
    still describes the host."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return sorted(k.lower() for k, on in features.items() if on and k.lower() in KERNEL_FLAGS)


def cpu_fingerprint() -> dict:
    """Architecture, CPU model and the features that pick int8 kernels, plus the runtimes' versions."""
    return dict(_fingerprint())


@functools.lru_cache(maxsize=1)
def _fingerprint() -> dict:  # read once per process: /proc/cpuinfo and package metadata do not change

    info: dict = {"machine": platform.machine(), "model": "", "flags": _cpuid_flags() or []}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    first: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip().lower(), value.strip())
    info["model"] = first.get("model name") or first.get("model") or first.get("hardware") or ""
    if not info["flags"]:
        info["flags"] = sorted(set(first.get("flags", first.get("features", "")).split()) & set(KERNEL_FLAGS))
    runtimes = package_versions(("ai-edge-litert", "onnxruntime"))
    info["runtimes"] = runtimes
    info["id"] = hashlib.sha256(json.dumps([info["machine"], info["flags"], runtimes]).encode()).hexdigest()[:16]
    return info


def describe_cpu(fp: dict) -> str:
    return f"{fp.get('machine')} [{' '.join(fp.get('flags', [])) or 'no int8 kernel flags'}]"


# -- writing (export) -----------------------------------------------------------------------------
def jpeg_references(pixels: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Each photo as the JPEG the bundle stores, and the pixels a device decodes from it (the
    float model's references are computed from these decoded pixels, never from the originals)."""
    blobs = [_jpeg(p) for p in pixels]
    return blobs, np.stack([_decode(b) for b in blobs])


def encode_references(blobs: list[bytes], decoded: np.ndarray, features: np.ndarray, probs: np.ndarray,
                      labels: np.ndarray) -> bytes:
    """``references.npz`` bytes (see :func:`jpeg_references` for ``blobs`` and ``decoded``)."""
    buf = io.BytesIO()
    np.savez(buf, jpeg=np.frombuffer(b"".join(blobs), np.uint8),
             offsets=np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64),
             pixels_sha256=np.array([hashlib.sha256(p.tobytes()).hexdigest() for p in decoded]),
             features=features.astype(np.float32), probs=probs.astype(np.float32), labels=labels.astype(np.int64))
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, np.uint8), "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _decode(blob: bytes) -> np.ndarray:
    """The device's own decoder (preprocess.decode_image), so the check covers it too."""

    return np.asarray(decode_image(blob, REFERENCES), np.uint8)


def thresholds(measured: dict, photos: int) -> dict:
    """What a device must reach: a little below what the export machine measured."""
    return {"min_cosine_mean": round(max(0.0, measured["cosine_mean"] - COSINE_MARGIN), 4),
            "min_agreement": round(max(0.0, measured["agreement"] - AGREEMENT_MARGIN_PHOTOS / photos), 4)}


# -- reading (device) -----------------------------------------------------------------------------
class References:
    def __init__(self, path: Path):
        try:
            with np.load(path, allow_pickle=False) as z:
                jpeg, offsets = z["jpeg"], z["offsets"]
                self.pixels_sha256 = [str(s) for s in z["pixels_sha256"]]
                self.features, self.probs, self.labels = z["features"], z["probs"], z["labels"]
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"cannot read the bundle's self-test references {path.name}: {exc}") from None
        self.pixels = np.stack([_decode(jpeg[offsets[i] : offsets[i + 1]].tobytes()) for i in range(len(offsets) - 1)])
        # The JPEG decoder is part of what is checked: on a device whose decoder gives other
        # pixels, the comparison below would measure the decoder, not the model file.
        self.decoded_identically = [hashlib.sha256(p.tobytes()).hexdigest() for p in self.pixels] == self.pixels_sha256

    def __len__(self) -> int:
        return len(self.labels)


def measure(runner, refs: References, spec, role: str, head: Layers | None) -> dict:
    """Run one model file on the reference pixels and compare with the float model."""
    outs = [runner.run_prepared(runner.prepare(refs.pixels[i : i + 1], spec)) for i in range(len(refs))]
    out = np.concatenate(outs).astype(np.float32)
    reference = refs.features if role == "backbone" else refs.probs
    cos = cosine(out, reference)
    if role == "backbone":
        pred, ref_pred = head_predict(out, head).argmax(1), head_predict(reference, head).argmax(1)
    else:
        pred, ref_pred = out.argmax(1), reference.argmax(1)
    return {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
            "agreement": round(float((pred == ref_pred).mean()), 4), "photos": int(len(refs)),
            "pixels_identical": refs.decoded_identically}


def verdict(entry: dict, measured: dict) -> tuple[bool, str]:
    """Compare a device measurement with the file's export-time record; (ok, one-line reason)."""
    st = entry.get("self_test")
    if not st:
        return True, "no self-test record for this file (bundle exported before self-tests)"
    problems = []
    if measured["cosine_mean"] < st["min_cosine_mean"]:
        problems.append(f"mean cosine to the float model {measured['cosine_mean']:.4f}, expected >= "
                        f"{st['min_cosine_mean']:.4f} (export machine: {st['cosine_mean']:.4f})")
    if measured["agreement"] < st["min_agreement"]:
        problems.append(f"top-1 agreement {measured['agreement']:.3f}, expected >= {st['min_agreement']:.3f} "
                        f"(export machine: {st['agreement']:.3f})")
    if problems:
        return False, "; ".join(problems)
    return True, (f"cosine {measured['cosine_mean']:.4f} (>= {st['min_cosine_mean']:.4f}), agreement "
                  f"{measured['agreement']:.3f} (>= {st['min_agreement']:.3f})")
