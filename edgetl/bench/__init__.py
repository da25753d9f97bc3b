"""Workflow: ``edgetl bench``, every format x precision of a run or bundle measured side by side
(accuracy against Keras, batch-1 latency, peak memory, each file in its own process)."""

from .benchmark import bench, measure_file

__all__ = ["bench", "measure_file"]
