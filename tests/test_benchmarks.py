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


def test_the_summary_says_the_gap_reads_the_df_alone_while_fn_counts_links():
    from trojan_gate.pipelines.benchmark_deepinspect import summary_lines

    text = summary_lines({"min_gap_trojan_minus_benign_max_df": -0.31, "false_positives": 0, "n_benign": 3,
                          "false_negatives": 0, "n_trojaned": 7, "targets_found": 5,
                          "queries_total": 1000, "seconds_total": 12.0})
    assert "-0.31" in text and "df alone" in text and "FN counts the links" in text
    assert "false negatives: 0 / 7" in text
