"""Decoding and preprocessing: every image mode becomes upright RGB, bad bytes are named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgetl import preprocess
from edgetl.errors import DataError

pytestmark = pytest.mark.device


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_mobilenet_scaling_is_minus_one_to_one():
    spec = preprocess.mobilenet_v2(8)
    px = np.array([[[0, 127, 255]]], np.uint8)
    out = preprocess.normalize(px, spec)
    np.testing.assert_allclose(out[0, 0], [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_caffe_preprocessing_flips_to_bgr_and_subtracts_mean():
    spec = preprocess.caffe(4, "vgg16")
    out = preprocess.normalize(np.array([[[10, 20, 30]]], np.uint8), spec)
    np.testing.assert_allclose(out[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-4)


@pytest.mark.parametrize(
    "mode,fmt,value,expected",
    [
        ("L", "PNG", 200, (200, 200, 200)),
        ("RGB", "BMP", (10, 20, 30), (10, 20, 30)),
        ("RGB", "WEBP", (0, 0, 0), (0, 0, 0)),
        ("CMYK", "JPEG", (0, 0, 0, 0), (255, 255, 255)),
        ("P", "GIF", 3, None),
    ],
)
def test_modes_and_formats_decode_to_rgb(mode, fmt, value, expected):
    img = Image.new(mode, (6, 4), value)
    out = preprocess.decode_image(_encode(img, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (6, 4)
    if expected is not None:
        assert np.abs(np.asarray(out, int)[2, 3] - np.array(expected)).max() <= 2


def test_16bit_png_is_scaled_to_8bit():
    arr = np.full((4, 4), 65535 // 2, np.uint16)
    out = preprocess.decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[0, 0]) == (127, 127, 127)  # 32767 / 65535 * 255 = 127.498


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    out = np.asarray(preprocess.decode_image(_encode(img, "PNG")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = preprocess.decode_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    arr = np.asarray(out, int)
    assert arr[5, 10].mean() > 200 and arr[35, 10].mean() < 50  # white ends up on top
    # The same photo large enough for a reduced-scale decode: scaled (1/2), then turned upright.
    big = img.resize((1000, 500), Image.Resampling.NEAREST)
    out = preprocess.decode_image(_encode(big, "JPEG", exif=exif, quality=95), "big.jpg", 224)
    assert out.size == (250, 500)
    arr = np.asarray(out, int)
    assert arr[60, 125].mean() > 200 and arr[440, 125].mean() < 50


def test_bad_bytes_name_the_file_and_the_reason():
    with pytest.raises(DataError, match=r"a\.jpg: not a recognised image \(first bytes b'hello"):
        preprocess.decode_image(b"hello world", "a.jpg")
    with pytest.raises(DataError, match=r"e\.png: the file is empty \(0 bytes\)"):
        preprocess.decode_image(b"", "e.png")
    jpeg = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(DataError, match=r"t\.jpg: cannot decode image"):
        preprocess.decode_image(jpeg[: len(jpeg) // 2], "t.jpg")


def test_load_batch_keeps_good_files_and_reports_bad(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (10, 10), (255, 255, 255)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    x, digests, skipped = preprocess.load_batch([good, bad], preprocess.mobilenet_v2(4))
    assert x.shape == (1, 4, 4, 3) and np.allclose(x, 1.0)
    assert len(digests) == 1 and len(digests[0]) == 64
    assert skipped == [(str(bad), f"{bad}: not a recognised image (first bytes b'not an i'); "
                                  "expected a JPEG, PNG, BMP, GIF or WebP image")]


def test_preprocessing_round_trips_through_dict():
    spec = preprocess.caffe(160, "resnet50")
    assert preprocess.Preprocessing.from_dict(spec.to_dict()) == spec
    with pytest.raises(DataError, match="invalid preprocessing description"):
        preprocess.Preprocessing.from_dict({"size": 3})


def test_large_jpegs_decode_at_a_reduced_dct_scale_close_to_a_full_decode():
    from .helpers import HYMENOPTERA

    photo = Image.open(sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[0]).convert("RGB")
    big = photo.resize((1000, 800), Image.Resampling.BICUBIC)
    jpeg = _encode(big, "JPEG", quality=92)
    # 1000x800 still covers 224x224 at 1/2 scale but not at 1/4 (250x200).
    assert preprocess.decode_image(jpeg, "big.jpg", 224).size == (500, 400)
    assert preprocess.decode_image(jpeg, "big.jpg").size == (1000, 800)
    assert preprocess.decode_image(_encode(big, "PNG"), "big.png", 224).size == (1000, 800)  # not a JPEG
    assert preprocess.decode_image(jpeg, "big.jpg", 600).size == (1000, 800)  # 1/2 would not cover 600
    full = preprocess.resize_rgb(preprocess.decode_image(jpeg, "big.jpg"), 224).astype(int)
    scaled = preprocess.resize_rgb(preprocess.decode_image(jpeg, "big.jpg", 224), 224).astype(int)
    assert 0.0 < np.abs(full - scaled).mean() < 1.5


def test_load_pixels_uses_the_reduced_scale_decode(tmp_path):
    from .helpers import HYMENOPTERA

    photo = Image.open(sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[0]).convert("RGB")
    path = tmp_path / "big.jpg"
    photo.resize((900, 900)).save(path, quality=90)
    px, digest = preprocess.load_pixels(path, 224)
    expected = preprocess.resize_rgb(preprocess.decode_image(path.read_bytes(), "x", 224), 224)
    assert np.array_equal(px, expected) and px.shape == (224, 224, 3)
    assert digest == preprocess.read_file_bytes(path)[1] and len(digest) == 64
