"""A task's scan calibration on digits: fitted, saved, verified, registered, found by the gate, refused when foreign."""
import json

import numpy as np
import pytest
from mlflow import MlflowClient

from trojan_gate.gates.data import Dataset
from trojan_gate.gates.errors import ArtifactIntegrityError, CalibrationMismatchError
from trojan_gate.gates.metascan import (ScanCalibration, calibration_sha256, conformal_p_value, load_calibration,
                                        save_calibration)
from trojan_gate.gates.oracle import ModelOracle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def digits_calibration(digits, tmp_path_factory):
    """A small calibration on the digits test split (the gate tests' held-out data): 48 shadows."""
    _, test = digits
    out = tmp_path_factory.mktemp("calibration")
    cal = ScanCalibration(n_shadows=48, calibration_share=0.5, false_block_rate=0.1, class_alpha=0.1, epochs=20,
                          n_queries=4, n_images=10, margin_steps=60, cache_dir=tmp_path_factory.mktemp("shadows"),
                          progress=False).fit(test)
    save_calibration(cal, out)
    return out


def test_a_saved_calibration_decides_like_the_fitted_one_and_estimates_false_blocks_by_hand(
        digits_calibration, digits, digits_trojan, digits_benign):
    _, test = digits
    cal = load_calibration(digits_calibration)
    assert cal.sha256_ == calibration_sha256(digits_calibration)
    for model in (digits_benign, digits_trojan):
        v = cal.decide(ModelOracle(model.onnx_bytes), Dataset(test.x, test.y))
        assert v.queries == len(cal.meta_.queries_) and v.calibration_sha256 == cal.sha256_
        # the false-block estimate is the share of benign calibration shadows scoring as high (hand count)
        hand = (1 + sum(s >= v.instance_score for s in cal.null_)) / (len(cal.null_) + 1)
        assert v.false_block_probability == pytest.approx(hand)
        assert v.is_trojaned == (v.instance_score > cal.threshold_) == (hand <= cal.false_block_rate + 1e-12)
        assert v.is_trojaned == bool(v.flagged_classes)
        again = cal.decide(ModelOracle(model.onnx_bytes))
        assert again.to_dict()["instance_score"] == v.to_dict()["instance_score"]  # no draw at scan time
    assert conformal_p_value(cal.null_, cal.threshold_ + 1e-9) <= cal.false_block_rate


def test_a_calibration_of_another_task_is_refused_by_name(digits_calibration, digits, digits_benign):
    train, test = digits
    cal = load_calibration(digits_calibration)
    oracle = ModelOracle(digits_benign.onnx_bytes)
    with pytest.raises(CalibrationMismatchError, match="held-out data"):
        cal.decide(oracle, Dataset(test.x[1:], test.y[1:]))
    with pytest.raises(CalibrationMismatchError, match="shape"):
        cal.check_task((1, 28, 28), 10)
    with pytest.raises(CalibrationMismatchError, match="classes"):
        cal.check_task((1, 8, 8), 3)


def test_a_tampered_calibration_is_refused(digits_calibration, tmp_path):
    import shutil

    for what in ("threshold", "arrays"):
        d = tmp_path / what
        shutil.copytree(digits_calibration, d)
        if what == "threshold":
            doc = json.loads((d / "calibration.json").read_text())
            doc["threshold"] = 1e9  # a gate that never blocks
            (d / "calibration.json").write_text(json.dumps(doc))
            match = "content sha256"
        else:
            with np.load(d / "meta.npz") as z:
                arrays = {k: z[k] for k in z.files}
            arrays["null"] = arrays["null"] - 100.0
            np.savez(d / "meta.npz", **arrays)
            match = "meta.npz sha256"
        with pytest.raises(ArtifactIntegrityError, match=match):
            load_calibration(d)
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        load_calibration(digits_calibration, expected_sha256="0" * 64)


def test_the_gate_finds_the_registered_calibration_of_its_task_and_falls_back_with_a_reason(
        mlflow_store, tmp_path, digits_calibration, digits, digits_benign, cached_scan):
    from trojan_gate.plugins.gate import GateConfig, run_gate
    from trojan_gate.plugins.registry import intake_onnx, version_tags
    from trojan_gate.plugins.scan_calibration import find_registered, register_calibration

    _, test = digits
    cal_ref = register_calibration(digits_calibration, "digits-scan-calibration")
    sha = calibration_sha256(digits_calibration)
    assert MlflowClient().get_registered_model("digits-scan-calibration").tags["trojan_gate.kind"] == "scan-calibration"
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    out = run_gate(ref.uri, Dataset(test.x, test.y), GateConfig(policy="block"), scan_fn=cached_scan)
    assert out.verdict in ("passed", "blocked"), out.error
    tags = version_tags(ref)
    assert tags["trojan_gate.scan.decision"] == "calibrated"
    assert tags["trojan_gate.scan.calibration"] == cal_ref.uri and tags["trojan_gate.scan.calibration_sha256"] == sha
    assert 0 < float(tags["trojan_gate.scan.false_block_probability"]) <= 1
    assert tags["trojan_gate.scan.paper.is_trojaned"] in ("true", "false")  # the paper's test beside it
    assert out.report["summary"]["decided_by"] == "calibrated"
    assert out.report["decision"]["calibration"]["source"] == cal_ref.uri
    assert (out.verdict == "blocked") == (tags["trojan_gate.scan.is_trojaned"] == "true")

    # other held-out data: no calibration of this task is registered -> the paper's test decides, and says why
    ref2 = intake_onnx(digits_benign.save(tmp_path / "benign2.onnx"), "clf2")
    fewer = Dataset(test.x[:-10], test.y[:-10])
    out2 = run_gate(ref2.uri, fewer, GateConfig(policy="block"), scan_fn=cached_scan)
    tags2 = version_tags(ref2)
    assert tags2["trojan_gate.scan.decision"] == "paper", out2.error
    assert "no registered scan calibration matches this task" in tags2["trojan_gate.scan.decision_reason"]
    assert tags2["trojan_gate.scan.calibration"] == ""
    assert find_registered("f" * 32) is None


def test_a_gate_told_to_use_a_foreign_calibration_fails_closed(mlflow_store, tmp_path, digits_calibration, digits,
                                                               digits_benign, cached_scan):
    from trojan_gate.plugins.gate import GateConfig, run_gate
    from trojan_gate.plugins.registry import intake_onnx, version_tags

    _, test = digits
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    config = GateConfig(policy="block", scan={"calibration": str(digits_calibration)})
    out = run_gate(ref.uri, Dataset(test.x[:-10], test.y[:-10]), config, scan_fn=cached_scan)
    assert out.verdict == "error" and "CalibrationMismatchError" in out.error and "held-out data" in out.error
    assert version_tags(ref)["trojan_gate.verdict"] == "error"
    assert not MlflowClient().get_registered_model("clf").aliases


def test_scan_cli_decides_with_a_calibration_and_reports_the_paper_beside(tmp_path, digits_calibration, digits,
                                                                        digits_benign):
    from trojan_gate.pipelines.cli import main

    _, test = digits
    held = tmp_path / "held.npz"
    np.savez_compressed(held, x=test.x, y=test.y)
    model = digits_benign.save(tmp_path / "m.onnx")
    code = main(["scan", str(model), "--heldout", str(held), "--calibration", str(digits_calibration), "--no-paper",
                 "--report", str(tmp_path / "r.json"), "--no-progress"])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["summary"]["decided_by"] == "calibrated" and code == (1 if rep["summary"]["is_trojaned"] else 0)
    assert (rep["decision"]["paper"] is None) == (not rep["summary"]["is_trojaned"])  # run only when flagged
    other = tmp_path / "other.npz"
    np.savez_compressed(other, x=test.x[:-10], y=test.y[:-10])
    assert main(["scan", str(model), "--heldout", str(other), "--calibration", str(digits_calibration),
                 "--report", str(tmp_path / "r2.json")]) == 2  # refused by name, exit 2


def test_the_margin_target_rule_points_at_the_planted_target_of_a_known_trojan(digits_calibration, digits,
                                                                                 digits_trojan, digits_benign):
    """The digits patch trojan (target 3): its reachable margin for 3 is the most unusual against benign shadows."""
    cal = load_calibration(digits_calibration)
    assert cal.margin_null_ is not None and cal.margin_mean_.shape == (10,)
    assert len(cal.margin_null_) == cal.pool_["calibration_benign"]
    z = {}
    for name, model in (("benign", digits_benign), ("trojan", digits_trojan)):
        oracle = ModelOracle(model.onnx_bytes)
        probe = cal.margin_probe()
        z[name] = cal.margin_z(probe.measure(oracle.predict_proba, oracle.input_shape, oracle.n_classes))
        assert oracle.queries == probe.queries(10)
    assert int(np.argmax(z["trojan"])) == 3
    assert z["trojan"][3] > z["benign"].max() + 1.0
    is_trojaned, flagged, _, _ = cal._decide(cal.threshold_ + 1.0, np.zeros(10), z["trojan"])
    assert is_trojaned and 3 in flagged
