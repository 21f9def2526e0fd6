"""The benchmark tables say where they were measured."""
from __future__ import annotations

import onnxruntime as ort
import torch

from trojan_gate.pipelines.benchmark_deepinspect import hardware


def test_the_deepinspect_table_names_where_torch_and_onnx_runtime_ran():
    line = hardware()
    assert f"torch {torch.__version__}" in line and f"ONNX Runtime {ort.__version__}" in line
    assert ("on GPU (" in line) == torch.cuda.is_available()
    assert line.endswith("on CUDA") == ("CUDAExecutionProvider" in ort.get_available_providers())
