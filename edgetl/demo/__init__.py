"""Workflow: ``edgetl demo``, the whole slice on a photo folder (train, export int8, teach the
device the held-out class)."""

from .demo import fetch_flowers, run_demo

__all__ = ["fetch_flowers", "run_demo"]
