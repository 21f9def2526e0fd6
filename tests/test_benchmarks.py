"""The benchmark tables say where they were measured."""
from __future__ import annotations

import onnxruntime as ort
import torch

from trojan_gate.pipelines.benchmarks.deepinspect import hardware


def test_the_deepinspect_table_names_where_torch_and_onnx_runtime_ran():
    line = hardware()
    assert f"torch {torch.__version__}" in line and f"ONNX Runtime {ort.__version__}" in line
    assert ("on GPU (" in line) == torch.cuda.is_available()
    assert line.endswith("on CUDA") == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_the_summary_says_the_gap_reads_the_df_alone_while_fn_counts_links():
    from trojan_gate.pipelines.benchmarks.deepinspect import summary_lines

    text = summary_lines({"min_gap_trojan_minus_benign_max_df": -0.31, "false_positives": 0, "n_benign": 3,
                          "false_negatives": 0, "n_trojaned": 7, "targets_found": 5,
                          "queries_total": 1000, "seconds_total": 12.0})
    assert "-0.31" in text and "df alone" in text and "FN counts the links" in text
    assert "false negatives: 0 / 7" in text


def test_the_benchmarks_share_one_zoo_and_refuse_unknown_names():
    import pytest

    from trojan_gate.pipelines.benchmarks.zoo import (DEEPINSPECT_MODELS, PATCH_MODELS, RUNTIME_MODELS,
                                                      STRIP_TRIGGERS, ZOO, entries, lab_config)

    for name in (list(DEEPINSPECT_MODELS) + list(PATCH_MODELS.values()) + list(STRIP_TRIGGERS.values())
                 + list(RUNTIME_MODELS.values())):
        assert name in ZOO
    assert PATCH_MODELS["patch"] == STRIP_TRIGGERS["patch"] == RUNTIME_MODELS["patch"] == "patch-small"  # one model, one definition
    assert lab_config(ZOO[RUNTIME_MODELS["watermark"]], epochs=2, arch="deep").trigger == "watermark"
    cfg = lab_config(ZOO["multi5-small"], epochs=6)
    assert cfg.targets == (0, 2, 3, 6, 8) and cfg.seed == 2 and cfg.epochs == 6
    with pytest.raises(ValueError, match="unknown zoo model"):
        entries("patch-small,patch-smal")
