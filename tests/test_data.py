"""Folder scanning and the deterministic, stratified split."""

from __future__ import annotations

import shutil

import pytest

from edgetl.data import read_labels, scan_folder, split_folder
from edgetl.errors import DataError

from .conftest import HYMENOPTERA

pytestmark = pytest.mark.device


def test_scan_sorts_classes_and_ignores_non_images(tmp_path):
    for c in ("b", "a"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "1.jpg").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("hi")
    f = scan_folder(tmp_path)
    assert f.classes == ["a", "b"]
    assert [s.relpath for s in f.samples] == ["a/1.jpg", "b/1.jpg"]
    assert f.ignored == ["a/notes.txt"]


def test_split_is_deterministic_stratified_and_location_independent(tmp_path):
    folder = scan_folder(HYMENOPTERA / "train")
    tr1, va1 = split_folder(folder, 0.2)
    tr2, va2 = split_folder(scan_folder(HYMENOPTERA / "train"), 0.2)
    assert [s.relpath for s in va1.samples] == [s.relpath for s in va2.samples]
    counts = folder.counts()
    val_counts = va1.counts()
    assert val_counts == {c: round(n * 0.2) for c, n in counts.items()}  # ants 124 -> 25, bees 121 -> 24
    assert val_counts == {"ants": 25, "bees": 24}
    assert not {s.relpath for s in tr1.samples} & {s.relpath for s in va1.samples}
    assert len(tr1.samples) + len(va1.samples) == len(folder.samples)
    # A copy elsewhere (another machine, another path) splits the same way.
    copy = tmp_path / "copy"
    shutil.copytree(HYMENOPTERA / "train", copy)
    _, va3 = split_folder(scan_folder(copy), 0.2)
    assert [s.relpath for s in va3.samples] == [s.relpath for s in va1.samples]
    # Another seed gives another split.
    _, va4 = split_folder(folder, 0.2, seed="other")
    assert [s.relpath for s in va4.samples] != [s.relpath for s in va1.samples]


def test_split_keeps_one_in_each_side_for_small_classes(tmp_path):
    for c, n in (("a", 2), ("b", 1), ("c", 3)):
        (tmp_path / c).mkdir()
        for i in range(n):
            (tmp_path / c / f"{i}.png").write_bytes(b"x")
    tr, va = split_folder(scan_folder(tmp_path), 0.1)
    assert va.counts() == {"a": 1, "b": 0, "c": 1}
    assert tr.counts() == {"a": 1, "b": 1, "c": 2}


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"data folder '.*nope' does not exist; expected a folder with one sub-folder per class"):
        scan_folder(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file; expected a folder"):
        scan_folder(tmp_path / "f.jpg")


def test_no_class_folders_mentions_loose_images(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"has no class sub-folders \(found 1 image files directly inside it"):
        scan_folder(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "1.jpg").write_bytes(b"x")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder\(s\) 'dogs' in .* contain no image files"):
        scan_folder(tmp_path)


def test_single_class_is_an_error_for_training(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "1.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"has 1 class folder\(s\) \['only'\]; expected at least 2"):
        scan_folder(tmp_path, min_classes=2)


def test_unknown_class_against_model_labels(tmp_path):
    for c in ("cat", "emu"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "1.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"class folder\(s\) \['emu'\] that the model does not know; its labels are \['cat', 'dog'\]"):
        scan_folder(tmp_path, classes=["cat", "dog"])


def test_labels_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("a\nb c\n\n")
    assert read_labels(p) == ["a", "b c"]
    p.write_text("\n")
    with pytest.raises(DataError, match="is empty; expected one label per line"):
        read_labels(p)


def test_odd_names_are_refused_or_handled_never_a_traceback(tmp_path):
    import os

    src = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[:3]
    for cls in ("ants", "bees"):
        (tmp_path / cls).mkdir()
        for i, f in enumerate(src):
            shutil.copy(f, tmp_path / cls / f"{i}.jpg")
    shutil.copy(src[0], tmp_path / "ants" / os.fsdecode(b"caf\xe9.jpg"))  # Latin-1, not UTF-8
    folder = scan_folder(tmp_path)
    train, val = split_folder(folder, 0.3)
    assert len(train.samples) + len(val.samples) == 7
    (tmp_path / "line\nbreak").mkdir()
    shutil.copy(src[0], tmp_path / "line\nbreak" / "x.jpg")
    with pytest.raises(DataError, match=r"class folder '.*line\\nbreak': the label 'line\\nbreak' holds control "
                                        r"characters \('\\n'\)"):
        scan_folder(tmp_path)
