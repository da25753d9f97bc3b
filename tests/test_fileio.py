"""Crash-safe writes: a failing write (full disk) leaves the old file untouched and no debris."""

from __future__ import annotations

import errno
import os

import click
import pytest

from edgetl.cli.common import handle_errors
from edgetl.fileio import atomic_write_bytes

pytestmark = pytest.mark.device


def test_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "head.npz"
    target.write_bytes(b"old contents")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new contents")
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.npz"]


def test_cli_edge_turns_os_errors_into_one_clear_line(tmp_path):
    @handle_errors
    def write():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "model.keras"))

    with pytest.raises(click.ClickException) as err:
        write()
    # Only what is known: the file and the reason (whether anything was half-written depends on the
    # caller; edgetl's own writes are atomic, extracting a zip is not).
    assert err.value.message == f"{tmp_path / 'model.keras'}: No space left on device"


def test_atomic_write_gives_usual_permissions(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"x")
    mode = (tmp_path / "f").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
