"""Patching a flagged model (DeepInspect Sec. 5): fine-tune on stamped, correctly labelled images."""
from .convert import onnx_to_torch, torch_to_onnx
from .measure import measure, paired_drop_standard_error, trojan_activation_rates
from .acceptance import ResidualRisk, assess_residual
from .patcher import Patcher
from .soup import uniform_soup
from .result import PatchResult

__all__ = ["PatchResult", "Patcher", "ResidualRisk", "assess_residual", "measure", "onnx_to_torch", "paired_drop_standard_error", "torch_to_onnx",
           "trojan_activation_rates", "uniform_soup"]
