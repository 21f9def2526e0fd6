"""DeepInspect (Chen et al., IJCAI'19), black-box: inversion, conditional generator, double-MAD test.

Public entry point: `DeepInspect(...).scan(model, heldout=...)` returning a `ScanResult`.
"""
from .anomaly import alpha_from_cutoff, cutoff_from_alpha, double_mad_test
from .result import ScanResult
from .scanner import DeepInspect, ScanConfig

__all__ = ["DeepInspect", "ScanConfig", "ScanResult", "alpha_from_cutoff", "cutoff_from_alpha", "double_mad_test"]
