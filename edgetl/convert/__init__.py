"""Keras models to TFLite flatbuffers, and the checks of a converted file (TensorFlow, imported
lazily). Below ``train/`` and ``export/``: the exporter converts every TFLite precision through
here, and ``edgetl train`` its float32 backbone for fast features."""
