"""Offline pretrained weights: point Keras' cache at a folder of .h5 files (stdlib only).

Call before Keras is imported. Real users online need none of this: ``weights='imagenet'``
downloads into ``$KERAS_HOME/models`` as usual.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
