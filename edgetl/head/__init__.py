"""The classification head, below both sides: the workstation (``train/``), the exporter
(``export/``) and the device (``device/``) import it; it imports none of them.

- :mod:`.arrays`: the head as plain (W, b) arrays, its file format and forward pass
- :mod:`.solver`: the converged solver (L-BFGS multinomial logistic regression, L2 by
  cross-validation, the subspace a device retrain solves in)
- :mod:`.fit`: the training configuration, SGD/Adam, new output units
- :mod:`.calibration`: temperature scaling and the new-class bias within a forgetting budget
- :mod:`.ncm`: nearest class mean
- :mod:`.tflite`: the trainable TFLite head, driven through its signatures (LiteRT)
"""

from .arrays import Layers, head_logits, head_predict, load_head, save_head, softmax, sum_by_class
from .calibration import fit_temperature, new_class_bias, with_bias, with_temperature, without_bias
from .fit import OPTIMIZERS, HeadTrainConfig, add_classes, drop_classes, resolve_optimizer, train_head
from .ncm import head_with_new_means, ncm_nearest, ncm_predict
from .solver import Subspace, choose_l2, one_blas_thread, solve_softmax

__all__ = [
    "OPTIMIZERS", "HeadTrainConfig", "Layers", "Subspace", "add_classes", "choose_l2", "drop_classes",
    "fit_temperature", "head_logits", "head_predict", "head_with_new_means", "load_head", "ncm_nearest", "ncm_predict", "new_class_bias",
    "one_blas_thread", "resolve_optimizer", "save_head", "softmax", "solve_softmax", "sum_by_class", "train_head",
    "with_bias", "with_temperature", "without_bias",
]
