"""One exception family for everything a user can cause.

The CLI turns these into ``click.ClickException`` at its edge; library code raises
them with a message that says what was received and what was expected.
"""

from __future__ import annotations

import importlib
import importlib.util


class EdgetlError(Exception):
    """Base class of every error edgetl raises on purpose."""


class DataError(EdgetlError):
    """A data folder, image or label is missing, unreadable or inconsistent."""


class ModelError(EdgetlError):
    """A model file, backbone or weight file is missing, wrong or incompatible."""


class ConfigError(EdgetlError):
    """An option or argument has a value edgetl cannot use."""


class BundleError(EdgetlError):
    """A bundle's manifest or files do not match what the manifest promises."""


class ExportError(EdgetlError):
    """A conversion failed or produced a file that does not pass its checks."""


class StoreError(EdgetlError):
    """The on-device sample store cannot be opened or written."""


class MissingDependencyError(EdgetlError):
    """An optional dependency is not installed; the message names the extra to install."""


def require_installed(module: str, extra: str) -> None:
    """Like :func:`require`, without importing the module (TensorFlow takes seconds to import)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"this needs the Python module {module!r}, which is not installed; "
                                     f"install it with: pip install 'edgetl[{extra}]'")


def require(module: str, extra: str):
    """Import an optional module or raise a MissingDependencyError with an install hint."""

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"this needs the Python module {module!r}, which is not installed "
            f"({exc}); install it with: pip install 'edgetl[{extra}]'"
        ) from exc
