"""edgetl: transfer learning at the edge.

Importing this package imports no TensorFlow: the workstation side lives in
``edgetl.train`` / ``edgetl.export`` and the device side in ``edgetl.device``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "package_versions"]


def package_versions(names) -> dict[str, str]:
    """The installed versions of these distributions (the ones not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
