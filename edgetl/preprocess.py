"""The one definition of image decoding and preprocessing (Pillow + NumPy only).

The workstation (feature extraction, training, export calibration, verification) and the
device runtime both call these functions, so the pixels a model sees cannot drift apart
between the two sides. The preprocessing itself is data (:class:`Preprocessing`), written
into every run folder and bundle manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The decoders a photo may reach, decided from its bytes.
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")  # (JPEG's opener also reads MPO)
ACCEPTED = "a JPEG, PNG, BMP, GIF or WebP image"
_OTHER_KINDS = ((b"%!PS", "PostScript"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"<svg", "SVG"),
                (b"<?xml", "XML"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))

# A truncated file must be an error, never a silently grey-padded picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Bumped whenever the pixels that a given file gives can change; part of feature-cache keys,
# so features cached by an older decoder are never mixed with new ones.
# 2: large JPEGs are decoded at a reduced DCT scale (see decode_image).
DECODE_VERSION = 2


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels in [0, 255] become a model's input.

    ``out = pixel[..., channel_order] * scale + offset[channel]`` after a resize of the
    whole image to ``size`` x ``size`` (no crop, aspect ratio not kept, bilinear with
    Pillow's antialiasing). A JPEG at least twice that size in both directions is first
    decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (see :func:`decode_image`).
    """

    size: int
    scale: float = 1.0 / 127.5
    offset: tuple[float, float, float] = (-1.0, -1.0, -1.0)
    channel_order: str = "RGB"
    resize: str = "bilinear"
    name: str = "mobilenet_v2"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offset"] = list(self.offset)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            return cls(
                size=int(d["size"]),
                scale=float(d["scale"]),
                offset=tuple(float(v) for v in d["offset"]),  # type: ignore[arg-type]
                channel_order=str(d.get("channel_order", "RGB")),
                resize=str(d.get("resize", "bilinear")),
                name=str(d.get("name", "custom")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"invalid preprocessing description {d!r}: {exc}") from exc

    def describe(self) -> str:
        return (
            f"resize to {self.size}x{self.size} ({self.resize}), {self.channel_order}, "
            f"x*{self.scale:.6g}+{list(self.offset)}"
        )


def mobilenet_v2(size: int) -> Preprocessing:
    """MobileNetV2 scales pixels to [-1, 1]."""
    return Preprocessing(size=size)


def passthrough(size: int, name: str) -> Preprocessing:
    """Backbones that rescale inside the model (MobileNetV3, EfficientNet) take [0, 255]."""
    return Preprocessing(size=size, scale=1.0, offset=(0.0, 0.0, 0.0), name=name)


def caffe(size: int, name: str) -> Preprocessing:
    """VGG16 / ResNet50: BGR, ImageNet mean subtracted, no scaling."""
    return Preprocessing(
        size=size,
        scale=1.0,
        offset=(-103.939, -116.779, -123.68),
        channel_order="BGR",
        name=name,
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


# Pixel budget: an image larger than this (after JPEG's reduced decoding) is refused before it
# is decoded. A 236 KB PNG can hold 9000x9000 pixels: 243 MB as RGB, 675 MB of peak memory on
# a device. 40 MP covers every phone camera; EDGETL_MAX_PIXELS changes it.
MAX_PIXELS = int(os.environ.get("EDGETL_MAX_PIXELS", 40_000_000))
# A photo stored to train on is at least this many pixels on each side: a thumbnail-sized (or 1x1)
# image blown up to the model's input teaches a class nothing but blur. Predictions take any size.
MIN_TRAINING_SIDE = 32


def decode_image(data: bytes, name: str = "<bytes>", size: int | None = None) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB Pillow image.

    Honours EXIF orientation; takes the first frame of animations; converts greyscale,
    palette, RGBA, CMYK and 16-bit images to RGB. Raises :class:`DataError` naming the
    file and the reason when the bytes are not a complete image.

    With ``size`` (the model's input side), a JPEG is decoded at the smallest of 1/1, 1/2,
    1/4 or 1/8 scale that still covers ``size`` x ``size`` (libjpeg's DCT scaling): a 12 MP
    phone photo then decodes in a few milliseconds instead of a hundred, and the following
    resize averages over fewer pixels. Workstation and device both decode this way.

    An image over :data:`MAX_PIXELS` is refused before decoding. Pillow's warnings (garbage
    EXIF, ...) are not printed: a photo either decodes or raises a DataError.
    """
    if not data:
        raise DataError(f"{name}: the file is empty (0 bytes); expected an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the documented formats' decoders see the bytes (never EPS/PostScript, which
            # Pillow hands to Ghostscript, nor any other plugin), whatever the file is called.
            img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            if size is not None and img.format == "JPEG":
                img.draft(None, (size, size))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{name}: {w}x{h} pixels ({w * h / 1e6:.1f} MP) is over the {MAX_PIXELS / 1e6:g} MP "
                                f"limit (it would take about {w * h * 3 / 1e6:.0f} MB to decode); scale it down, "
                                "or raise EDGETL_MAX_PIXELS")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnidentifiedImageError:
        what = next((kind for magic, kind in _OTHER_KINDS if data.startswith(magic)), None)
        raise DataError(
            f"{name}: " + (f"a {what} file, not a photo" if what else f"not a recognised image (first bytes {data[:8]!r})")
            + f"; expected {ACCEPTED}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: image too large to decode safely ({exc})") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None
    except Exception as exc:  # a malformed file can trip any part of a decoder (EXIF, palettes, ...)
        raise DataError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None


def decoded_pixels(data: bytes, size: int | None = None) -> int:
    """How many pixels :func:`decode_image` would decode ``data`` to (a JPEG at its reduced DCT
    scale), read from the header alone; 0 when the bytes are no image it accepts (decoding them
    then gives the error). Lets a caller bound what a request may cost before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            if size is not None and img.format == "JPEG":
                img.draft(None, (size, size))
            w, h = img.size
            return int(w) * int(h)
    except Exception:  # any header a decoder rejects: decode_image says why
        return 0


def read_file_bytes(path: str | Path) -> tuple[bytes, str]:
    """A file's bytes and their sha256 (the key of feature caches and duplicate checks)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a folder; expected an image file") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read file ({exc})") from None
    return data, hashlib.sha256(data).hexdigest()


def read_image_file(path: str | Path, size: int | None = None) -> tuple[Image.Image, str]:
    """Read and decode one file; return the RGB image and the sha256 of its bytes.

    The bytes are read once and serve both the decoder and the cache key. ``size``: see
    :func:`decode_image`.
    """
    data, digest = read_file_bytes(path)
    return decode_image(data, str(path), size), digest


def resize_rgb(img: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to size x size and return uint8 HxWx3."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def thumbnail_jpeg(pixels: np.ndarray, size: int = 112, quality: int = 80) -> bytes:
    """A small JPEG of uint8 HxWx3 pixels (e.g. the model's input: what it saw)."""

    img = Image.fromarray(np.asarray(pixels, np.uint8))
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def normalize(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 (..., H, W, 3) RGB pixels to the model's float32 input."""
    x = pixels.astype(np.float32)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    elif spec.channel_order != "RGB":
        raise DataError(f"channel_order must be 'RGB' or 'BGR'; received {spec.channel_order!r}")
    return x * np.float32(spec.scale) + np.asarray(spec.offset, dtype=np.float32)


def _big_enough(img: Image.Image, name: str, min_side: int) -> Image.Image:
    w, h = img.size
    if min(w, h) < min_side:
        raise DataError(f"{name}: {w}x{h} pixels is too small to learn from; a photo to train on needs at least "
                        f"{min_side} pixels on each side")
    return img


def load_pixels(path: str | Path, size: int, min_side: int = 0) -> tuple[np.ndarray, str]:
    """One file to uint8 size x size x 3 pixels and the sha256 of its bytes (``min_side``: refuse
    a smaller photo, e.g. :data:`MIN_TRAINING_SIDE` for a training sample)."""
    img, digest = read_image_file(path, size)
    return resize_rgb(_big_enough(img, str(path), min_side), size), digest


def pixels_from_bytes(data: bytes, name: str, size: int, min_side: int = 0) -> tuple[np.ndarray, str]:
    """Image bytes held in memory (e.g. an upload, reported as ``name``) to uint8 pixels, as
    :func:`load_pixels` does for a file, and the sha256 of the bytes."""
    return resize_rgb(_big_enough(decode_image(data, name, size), name, min_side), size), \
        hashlib.sha256(data).hexdigest()


def load_batch(
    paths: Sequence[str | Path], spec: Preprocessing
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Decode and preprocess many files, skipping the bad ones.

    Returns the float32 batch of the good files, their sha256 digests, and
    ``(path, reason)`` for each file that could not be used.
    """
    pixels, digests, bad = load_pixels_batch(paths, spec.size)
    return normalize(pixels, spec), digests, bad


def load_pixels_batch(
    paths: Sequence[str | Path], size: int
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Like :func:`load_batch`, but the uint8 pixels (N, size, size, 3) before normalization."""
    arrays: list[np.ndarray] = []
    digests: list[str] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        try:
            px, digest = load_pixels(p, size)
        except DataError as exc:
            bad.append((str(p), str(exc)))
            continue
        arrays.append(px)
        digests.append(digest)
    batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return batch, digests, bad


def iter_chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
