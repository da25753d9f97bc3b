"""Offline pretrained weights: point Keras' cache at a folder of .h5 files (stdlib only).

Call before Keras is imported. Real users online need none of this: ``weights='imagenet'``
downloads into ``$KERAS_HOME/models`` as usual.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import DataError
from .fileio import atomic_write_bytes, sha256_file


def use_offline_weights(folder: str | Path, keep_existing: bool = True) -> Path:
    """Make a temporary ``KERAS_HOME`` whose ``models/`` links to every .h5 file in ``folder``.

    With ``keep_existing``, an already set ``KERAS_HOME`` wins and nothing is done.
    Returns the ``KERAS_HOME`` in force.
    """
    if keep_existing and os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"])
    home = Path(tempfile.mkdtemp(prefix="edgetl-keras-home-"))
    (home / "models").mkdir()
    for f in Path(folder).glob("*.h5"):
        try:
            os.symlink(f.resolve(), home / "models" / f.name)
        except OSError:
            shutil.copy(f, home / "models" / f.name)
    os.environ["KERAS_HOME"] = str(home)
    return home


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def keras_models_dir() -> Path:
    """Keras' weight cache: ``$KERAS_HOME/models`` (default ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def add_weights(paths: list[str | Path]) -> list[dict]:
    """Copy Keras ``.h5`` weight files (or every ``.h5`` in a folder) into the Keras cache.

    For machines without internet: ``weights='imagenet'`` then finds them there. Safe to repeat:
    a file already there with the same content is left alone. Returns one ``{file, status}``
    per file (``added``, ``replaced`` or ``already there``).
    """

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.h5"))
            if not found:
                raise DataError(f"{p} holds no .h5 file; expected Keras weight files such as "
                                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; expected an .h5 weight file or a folder of them")
    for f in files:
        with open(f, "rb") as fh:
            if fh.read(8) != HDF5_MAGIC:
                raise DataError(f"{f} is not an HDF5 (.h5) file; expected Keras weight files")
    dest = keras_models_dir()
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dest / f.name
        if target.is_file() and sha256_file(target) == sha256_file(f):
            status = "already there"
        else:
            status = "replaced" if target.exists() else "added"
            atomic_write_bytes(target, f.read_bytes())
        out.append({"file": str(target), "status": status})
    return out
