"""The science of trojan-gate, free of MLflow.

oracle (black-box ONNX queries), data loading and validation, the trojan lab,
DeepInspect (inversion, generator, statistic, reference models, anomaly test, scan),
patching and STRIP.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("trojan-gate")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
