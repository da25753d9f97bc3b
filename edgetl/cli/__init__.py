"""The ``edgetl`` command line (click). Heavy libraries are imported inside each command."""

from .main import cli

__all__ = ["cli"]
