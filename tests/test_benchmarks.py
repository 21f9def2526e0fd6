"""The benchmark tables say where they were measured."""
from __future__ import annotations

import onnxruntime as ort
import pytest
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


def test_the_vendor_patch_table_counts_what_the_issue_asks_and_refuses_benign_models(tmp_path):
    import argparse

    import pytest

    from trojan_gate.pipelines.benchmarks.patch_zoo import run_vendor, table

    args = argparse.Namespace(models="a,b,c", recipes="default", patch_seeds_zoo="0", seed=0, calibration="cal",
                              max_accuracy_drop=0.01)
    base = {"family": "patch", "recipe": "default", "patch_seed": 0, "flagged": [3], "asr_before": 1.0,
            "acc_before": 0.90, "acc_drop_se": 0.002, "residual": {"mask": {"max_flagged": 0.1, "max_unflagged": 0.3,
                                                                            "untargeted": 0.2}}}
    rows = [{**base, "model": "a", "verdict": "patched", "asr_after": 0.02, "acc_after": 0.895,  # meets both
             "residual_areas": {"0": 0.05, "1": 0.05, "2": 0.05, "3": 0.00625}},
            {**base, "model": "b", "verdict": "patched", "asr_after": 0.30, "acc_after": 0.90},  # a false "patched"
            {**base, "model": "c", "verdict": "blocked", "reason": "residual evidence refuses", "asr_after": 0.9,
             "acc_after": 0.90}]
    text = table(rows, args)
    assert "patched 2, of which 1 with true-trigger ASR <= 5%" in text and "ASR > 10%: 1." in text
    assert "| a | patch | default | 0 | [3] | 100.0% | 2.0% | 90.0% | -0.50 (± 0.20) | 0.10 / 0.30 / 0.20 | 3.0 (3) |" in text
    assert "| b | patch | default | 0 | [3] | 100.0% | 30.0% | 90.0% | +0.00 (± 0.20) | 0.10 / 0.30 / 0.20 | - |" in text
    bad = argparse.Namespace(models="benign-small-s1000", recipes="default", patch_seeds_zoo="0")
    with pytest.raises(ValueError, match="not trojaned"):
        run_vendor(bad)


def _throughput_args(tmp_path, digits, model, **extra):
    import argparse

    import numpy as np

    _, test = digits
    np.savez(tmp_path / "held.npz", x=test.x[:200], y=test.y[:200])
    np.savez(tmp_path / "inputs.npz", x=test.x[200:300])
    return argparse.Namespace(model=str(model), heldout=str(tmp_path / "held.npz"), inputs=str(tmp_path / "inputs.npz"),
                              artifacts=str(tmp_path / "checks"), n=250, batch=64, in_process_n=128, repeats=1,
                              rest=False, rest_rows="1,10", rest_seconds=0.5, out=str(tmp_path / "t.md"), **extra)


def test_the_throughput_table_measures_every_path_against_plain(tmp_path, digits, trojan_onnx):
    from trojan_gate.pipelines.benchmarks.throughput import run

    args = _throughput_args(tmp_path, digits, trojan_onnx)
    assert run(args) == 0
    text = (tmp_path / "t.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {"plain", "strip", "runtime"} <= set(rows)
    assert "| 11.00 |" in rows["strip"]  # STRIP: the input and its N = 10 copies, no reference
    cli = [line for line in text.splitlines() if line.startswith("| strip | ") and "MiB" in line][0].split(" | ")
    assert float(cli[1]) > 0 and cli[7] == "yes"  # wall seconds; flags equal to the numpy copies'
    assert sorted(p.name for p in (tmp_path / "checks").iterdir()) == ["runtime", "strip"]  # kept for the next run
    mtime = (tmp_path / "checks" / "strip").stat().st_mtime
    assert run(args) == 0 and (tmp_path / "checks" / "strip").stat().st_mtime == mtime  # reused, not recalibrated


@pytest.mark.slow
@pytest.mark.serve
def test_the_rest_table_serves_plain_and_guarded_models_the_same_way(tmp_path, digits, trojan_onnx):
    from trojan_gate.pipelines.benchmarks.rest import rest_benchmark, rest_markdown
    from trojan_gate.pipelines.benchmarks.throughput import checks, tiled

    args = _throughput_args(tmp_path, digits, trojan_onnx)
    artifacts = checks(trojan_onnx, tmp_path / "held.npz", tmp_path / "checks")
    rows = rest_benchmark(trojan_onnx, artifacts, tiled(tmp_path / "inputs.npz", 20), [1, 10], args.rest_seconds)
    assert [(r["server"], r["rows"]) for r in rows] == [(s, n) for s in ("plain", "strip", "runtime") for n in (1, 10)]
    assert all(r["requests"] >= 5 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    text = "\n".join(rest_markdown(rows))
    assert "| plain | 10 |" in text and "| runtime | 1 |" in text


def test_the_run_time_benchmark_measures_every_detector_and_the_students_inheritance(digits, digits_trojan):
    from argparse import Namespace

    import numpy as np

    from trojan_gate.gates.classifier_training import train_reference
    from trojan_gate.gates.data import Dataset
    from trojan_gate.pipelines.benchmarks.runtime import DETECTORS, evaluate, markdown
    from trojan_gate.pipelines.benchmarks.runtime_models import Subject

    _, test = digits
    held, clean, rest = np.arange(0, 300), np.arange(300, 450), np.arange(450, len(test.x))
    victims = rest[test.y[rest] != 3]
    subject = Subject("digits-patch", "patch", "small", digits_trojan.onnx_bytes, [3], digits_trojan.clean_accuracy,
                      digits_trojan.attack_success_rate, test.x[held], test.y[held], test.x[clean],
                      digits_trojan.stamp(test.x[victims]))
    (ref_x, ref_y), (cal_x, _) = subject.halves()
    assert len(ref_x) == len(cal_x) == 150
    labels_ref = train_reference(Dataset(ref_x, ref_y), 10, epochs=20, seed=0)[0]
    args = Namespace(seed=0, frr=0.05, zoo="lab", triggers="patch", archs="small", epochs=30, heldout=300,
                     train_limit=None, n_eval=150)
    r = evaluate(subject, labels_ref, args)
    for d in DETECTORS:
        frr, far, calls_clean, calls_stamped = r[d]
        assert 0.0 <= frr <= 1.0 and 0.0 <= far <= 1.0 and 1.0 <= calls_clean <= 11.0
    assert r["check"][2] == r["check, full N"][2] == 1.0  # the default check asks no copies: one call per input
    assert r["entropy"][2] == 11.0  # STRIP's entropy: the input and its N = 10 copies
    # the digits patch is caught: 83% at FRR 8.7% measured, from 150 reference and 150 calibration images (the
    # features' class means rest on 15 images per class here; the vendor-like zoo fits them on 2,500)
    assert r["check"][1] <= 0.25 and r["check"][0] <= 0.15, r["check"]
    assert r["check (labels)"][1] <= 0.25 and r["activation"][1] <= 0.35, (r["check (labels)"], r["activation"])
    assert 0.0 <= r["student_asr"] <= 1.0 and r["student_agreement"] >= 0.8
    text = markdown([r], None, args)
    assert "| patch | small | digits-patch |" in text and "student: agreement / ASR" in text


def test_the_detection_benchmark_refuses_lenet_in_the_shadow_pool_and_names_it(tmp_path, digits):
    """LeNet is the detection benchmark's architecture no shadow has: a pool asked for it is refused
    before a shadow is trained (and so is an empty list)."""
    import argparse

    from trojan_gate.pipelines.benchmarks.detection import add_arguments, calibration_for

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for archs in ("small,lenet", ","):
        args = parser.parse_args(["--calibration", str(tmp_path / "cal"), "--shadow-cache", str(tmp_path / "sh"),
                                  "--architectures", archs])
        with pytest.raises(ValueError, match="--architectures"):
            calibration_for(args, digits[1])
    assert not (tmp_path / "sh").exists() and not (tmp_path / "cal").exists()


def test_the_detection_table_says_how_many_classes_a_flagged_trojan_has_flagged():
    """'All targets among flagged' is met by flagging every class; the table puts the median number of classes
    flagged per flagged trojan beside it (per seed, over the flagged trojaned models only)."""
    from trojan_gate.pipelines.benchmarks.detection import summarise, tables

    def row(model, targets, flagged, seed=0):
        summary = {"name": model, "arch": "small", "family": "patch" if targets else "none", "recipe": "vendor",
                   "targets": targets, "clean_accuracy": 0.9, "attack_success": 1.0 if targets else None}
        return {"model": model, "decision": "calibrated", "seed": seed, "is_trojaned": bool(flagged), "score": 1.0,
                "flagged": flagged, "seconds": 0.1, "summary": summary}

    rows = [row("a", [3], list(range(10))), row("b", [3], [3]), row("c", [4], [2, 4, 6]), row("d", [5], []),
            row("e", [], [])]
    p = summarise(rows, "calibrated", [0])["per_seed"][0]
    assert (p["flagged"], p["targets"], p["classes_flagged"]) == (3, 3, 3.0)
    line = tables(rows, [0], ["calibrated"]).splitlines()[2]
    assert line.startswith("| calibrated | all (small, 6-conv) | 0 |") and "| 3/4 (75%) | 3/4 (75%) | 3 |" in line
    assert summarise([row("e", [], [])], "calibrated", [0])["per_seed"][0]["classes_flagged"] is None
