"""edgetl: transfer learning at the edge.

Importing this package imports no TensorFlow: the workstation side lives in
``edgetl.train`` / ``edgetl.export`` and the device side in ``edgetl.device``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
