"""Image folders: one sub-folder per class, and decoding them (Pillow + NumPy, shared by both sides).

Scanning lists files by extension and never decodes; decoding happens once, during
feature extraction, where a bad file is skipped with its reason (or fails with
``strict=True``).
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .labels import check_label, printable
from .preprocess import IMAGE_EXTENSIONS, load_batch


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    relpath: str  # "class/file.jpg", POSIX separators: the split key


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    samples: list[Sample]
    ignored: list[str] = field(default_factory=list)  # files without an image extension

    def counts(self) -> dict[str, int]:
        c = {name: 0 for name in self.classes}
        for s in self.samples:
            c[self.classes[s.label]] += 1
        return c

    def subset(self, samples: list[Sample]) -> ImageFolder:
        return ImageFolder(self.root, list(self.classes), samples, [])


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_folder(root: str | Path, classes: list[str] | None = None, *, min_classes: int = 1) -> ImageFolder:
    """List a folder of class folders.

    ``classes`` fixes the label order (e.g. a trained model's labels); a folder whose
    class is not among them is an error. Without it, classes are the sorted names of
    the sub-folders that hold at least one image file.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist; expected a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file; expected a folder with one sub-folder per class")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in root.iterdir() if is_image_file(p))
    if not subdirs:
        hint = f" (found {len(loose)} image files directly inside it: put them in one sub-folder per class)" if loose else ""
        raise DataError(f"data folder {str(root)!r} has no class sub-folders{hint}")

    found: dict[str, list[Path]] = {}
    ignored: list[str] = []
    for d in subdirs:
        files = []
        for p in sorted(d.rglob("*")):
            if p.is_dir():
                continue
            if is_image_file(p):
                files.append(p)
            elif not p.name.startswith("."):
                ignored.append(p.relative_to(root).as_posix())
        found[d.name] = files

    for name in found:
        check_label(name, f"class folder '{printable(str(root / name))}'")
    empty = [name for name, files in found.items() if not files]
    if classes is None:
        if empty:
            raise DataError(
                f"class folder(s) {', '.join(repr(e) for e in empty)} in {str(root)!r} contain no image files "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        classes = sorted(found)
    else:
        unknown = sorted(set(found) - set(classes))
        unknown = [u for u in unknown if found[u]]
        if unknown:
            raise DataError(
                f"{str(root)!r} has class folder(s) {unknown} that the model does not know; "
                f"its labels are {classes}"
            )
    if len(classes) < min_classes:
        raise DataError(
            f"data folder {str(root)!r} has {len(classes)} class folder(s) {classes}; "
            f"expected at least {min_classes} (one sub-folder per class)"
        )
    index = {name: i for i, name in enumerate(classes)}
    samples = [
        Sample(path=p, label=index[name], relpath=p.relative_to(root).as_posix())
        for name in sorted(found, key=lambda n: index.get(n, -1))
        if name in index
        for p in found[name]
    ]
    return ImageFolder(root=root, classes=list(classes), samples=samples, ignored=ignored)


def _split_key(relpath: str, seed: str) -> str:
    return hashlib.sha256(f"{seed}\0{relpath}".encode("utf-8", "surrogateescape")).hexdigest()


def split_folder(folder: ImageFolder, val_fraction: float, seed: str = "edgetl") -> tuple[ImageFolder, ImageFolder]:
    """Deterministic, stratified train/validation split.

    Within each class, files are ordered by the sha256 of their relative path (and a
    seed), and the first ``round(n * val_fraction)`` go to validation (at least one, and
    at least one stays in training, when the class has two or more files). The split
    depends on nothing but the file names, so it is the same on every machine and run.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive); received {val_fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in folder.samples:
        by_class.setdefault(s.label, []).append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: _split_key(s.relpath, seed))
        n = len(items)
        k = int(round(n * val_fraction))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        val.extend(items[:k])
        train.extend(items[k:])
    order = {s.relpath: i for i, s in enumerate(folder.samples)}
    train.sort(key=lambda s: order[s.relpath])
    val.sort(key=lambda s: order[s.relpath])
    return folder.subset(train), folder.subset(val)


def load_samples(samples: list[Sample], spec) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode and preprocess samples: the float32 batch and int64 labels of the readable ones,
    and ``(path, reason)`` for each unreadable one (labels stay aligned with the batch)."""
    x, _, bad = load_batch([s.path for s in samples], spec)
    bad_paths = {b[0] for b in bad}
    y = np.array([s.label for s in samples if str(s.path) not in bad_paths], np.int64)
    return x, y, bad


def read_labels(path: str | Path) -> list[str]:
    """A labels file: one label per line, in output order; blank lines at the end are dropped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read labels file {str(p)!r}: {exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"labels file {str(p)!r} is empty; expected one label per line")
    return [line.strip() for line in lines]


GLOB_CHARS = set("*?[")


def expand_images(args: list[str | Path]) -> list[Path]:
    """Command-line image arguments as files: a folder gives its image files (recursively,
    sorted), a glob pattern (``'test/*/*.jpg'``, ``**`` allowed) the images it matches, a file
    itself. A name that matches nothing is kept, so that the caller reports it by name."""

    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if is_image_file(f))
            if not found:
                raise DataError(f"folder {str(p)!r} holds no image files (extensions {', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif not p.exists() and GLOB_CHARS & set(str(a)):
            found = sorted(Path(f) for f in glob.glob(str(a), recursive=True) if is_image_file(Path(f)))
            if not found:
                raise DataError(f"pattern {str(a)!r} matches no image files")
            out += found
        else:
            out.append(p)
    return out
