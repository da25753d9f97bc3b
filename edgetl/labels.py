"""Labels and file names as users see them: checked where they enter, printable where they leave.

A label becomes a line of labels.txt, a JSON string, a folder name on export and text on a
terminal; a newline would split labels.txt, and control characters (ANSI escapes) would reach
the terminal raw. So labels are checked wherever they enter (class folder names, ``--label``,
a bundle's manifest). File names are bytes on Linux; one that is not valid UTF-8 reaches Python
with surrogate escapes, which cannot be printed or stored as text: :func:`printable` makes them
safe to show, :func:`storable` safe to store (both reversible enough to find the file).
"""

from __future__ import annotations

import os
import unicodedata

from .errors import DataError

MAX_LABEL_CHARS = 200


def check_label(label: object, where: str = "label") -> str:
    """``label`` if it is a usable label; otherwise DataError saying what was received."""
    if not isinstance(label, str):
        raise DataError(f"{where}: a label must be text; received {label!r}")
    bad = [c for c in label if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
    if not label.strip():
        raise DataError(f"{where}: the label is empty or only spaces; received {label!r}")
    if bad:
        raise DataError(f"{where}: the label '{printable(label)}' holds control characters "
                        f"({', '.join(sorted({repr(c) for c in bad}))}); use letters, digits, spaces and punctuation")
    if len(label) > MAX_LABEL_CHARS:
        raise DataError(f"{where}: the label is {len(label)} characters long; at most {MAX_LABEL_CHARS}")
    return label


def printable(text: str) -> str:
    """``text`` safe for a terminal or JSON: undecodable bytes (surrogate escapes) become \\xNN,
    control characters become their escapes."""
    return "".join(c if unicodedata.category(c) not in ("Cc", "Cf", "Cs") else repr(c)[1:-1] for c in storable(text))


def storable(text: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes as \\xNN), for a database or JSON."""
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text
