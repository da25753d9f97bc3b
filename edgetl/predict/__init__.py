"""Workflow: predict with and evaluate a model of any kind (a run folder's Keras model, one
exported file, a bundle) on photos. Composes the parts: runtime, preprocess, bundle, data, metrics."""

from .predictor import (
    FilePredictor,
    KerasPredictor,
    Predictor,
    SplitPredictor,
    evaluate,
    open_predictor,
    predict_files,
)

__all__ = ["FilePredictor", "KerasPredictor", "Predictor", "SplitPredictor", "evaluate", "open_predictor",
           "predict_files"]
