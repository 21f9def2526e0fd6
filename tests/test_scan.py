"""End-to-end black-box DeepInspect scans of tiny digits lab models, and the scan CLI."""
import json

import numpy as np
import pytest

from trojan_gate.gates.errors import QueryBudgetExceeded
from trojan_gate.gates.deepinspect.inversion import ModelInversion
from trojan_gate.gates.oracle import ModelOracle
from helpers import scan
from trojan_gate.pipelines.cli import main


@pytest.fixture(scope="module")
def trojan_scan(digits_trojan):
    return scan(digits_trojan.onnx_bytes, seed=0, progress=False)


@pytest.fixture(scope="module")
def benign_scan(digits_benign):
    return scan(digits_benign.onnx_bytes, seed=0, progress=False)


def test_flags_the_trojan_target(trojan_scan, digits_trojan):
    assert digits_trojan.attack_success_rate > 0.9
    assert trojan_scan.is_trojaned
    assert 3 in trojan_scan.flagged_classes
    assert trojan_scan.deviation_factors[3] > trojan_scan.threshold
    assert int(np.argmin(trojan_scan.statistics)) == 3


def test_does_not_flag_the_benign_model(benign_scan):
    assert not benign_scan.is_trojaned
    assert benign_scan.flagged_classes == []
    assert benign_scan.instance_score <= benign_scan.threshold
    assert "co-targets" not in benign_scan.phases and benign_scan.co_activation is None  # links never start a flag


def test_result_contract(trojan_scan):
    r = trojan_scan
    k, shape = 10, (1, 8, 8)
    assert r.n_classes == k and tuple(r.input_shape) == shape
    assert len(r.statistics) == len(r.deviation_factors) == len(r.success_rates) == k
    assert r.trigger_samples.shape[0] == k and r.trigger_samples.shape[2:] == shape
    assert r.trigger_samples.dtype == np.float32
    assert r.inverted_x.shape[1:] == shape and set(np.unique(r.inverted_y)) == set(range(k))
    assert r.inverted_x.min() >= 0.0 and r.inverted_x.max() <= 1.0
    # every query is attributed to a phase and the phases add up
    assert set(r.phases) == {"inversion", "generator", "statistics", "co-targets"}  # co-targets: only when flagged
    assert sum(p["queries"] for p in r.phases.values()) == r.queries > 0
    n = len(r.inverted_y)
    assert r.phases["co-targets"]["queries"] == sum(int((r.inverted_y != t).sum()) for t in range(k)) == (k - 1) * n
    assert np.asarray(r.co_activation).shape == (k, k) and r.co_targets == []  # a single-target trojan
    assert r.seconds > 0 and all(p["seconds"] >= 0 for p in r.phases.values())
    assert r.config["generator_steps_run"] > 0
    assert {"numpy", "torch", "onnxruntime"} <= set(r.versions)
    d = json.loads(json.dumps(r.to_dict()))
    for key in ("is_trojaned", "instance_score", "threshold", "flagged_classes", "deviation_factors", "queries",
                "seconds", "phases", "config", "co_targets", "co_activation"):
        assert key in d
    assert d["instance_score"] == pytest.approx(max(d["deviation_factors"]), abs=1e-6)
    out = r.to_detector_output()  # Alibi Detect's shape, one vocabulary
    assert out["data"] == {"instance_score": r.instance_score, "is_trojaned": True, "threshold": r.threshold}
    # the generator used by patching: deterministic samples, stamps clipped to [0, 1]
    g = r.generator
    a, b = g.sample(3, 5, seed=7), g.sample(3, 5, seed=7)
    assert a.shape == (5,) + shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    x = r.inverted_x[:5]
    stamped = g.stamp(x, 3, seed=7)
    np.testing.assert_allclose(stamped, np.clip(x + a, 0, 1))
    # the recovered target-3 trigger works on the oracle
    assert r.success_rates[3] >= 0.8


SMALL = dict(n_per_class=5, inversion_steps=20, generator_steps=40)  # cheap scans for mechanics


def test_deterministic_for_a_seed(digits_trojan):
    a = scan(ModelOracle(digits_trojan.onnx_bytes), seed=4, progress=False, **SMALL)
    b = scan(digits_trojan.onnx_bytes, seed=4, progress=False, **SMALL)
    assert a.statistics == b.statistics
    assert a.deviation_factors == b.deviation_factors
    assert a.queries == b.queries
    np.testing.assert_array_equal(a.inverted_x, b.inverted_x)
    np.testing.assert_array_equal(a.trigger_samples, b.trigger_samples)
    c = scan(digits_trojan.onnx_bytes, seed=5, progress=False, **SMALL)
    assert c.statistics != a.statistics


def test_budget(digits_trojan):
    with pytest.raises(QueryBudgetExceeded):
        scan(digits_trojan.onnx_bytes, budget=300, progress=False, **SMALL)
    budget = 60_000  # the statistics phase reserves 10 classes x 5 supports x 12 passes x 45 images
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    r = scan(oracle, budget=budget, progress=False, **SMALL)
    assert r.queries <= budget and oracle.queries == r.queries
    assert oracle.budget is None  # the caller's oracle gets its own budget back
    assert r.phases["inversion"]["queries"] <= 0.3 * budget + 50
    assert 0 < r.config["generator_steps_run"] < r.config["generator_steps"]


def test_heldout_is_the_substitute_set(digits, digits_trojan):
    _, test = digits
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    inv = ModelInversion(n_per_class=4, progress=False).fit(oracle, test)
    assert inv.queries_ == 40 and inv.steps_run_ == 0
    for cls in range(10):  # every substitute image is a held-out image of its class
        rows = test.x[test.y == cls].reshape(-1, 64)
        for img in inv.x_[inv.y_ == cls]:
            assert (np.abs(rows - img.reshape(1, 64)).sum(1) == 0).any()


def test_cli_exit_codes(tmp_path, digits_trojan, digits_benign):
    trojan = digits_trojan.save(tmp_path / "trojan.onnx")
    benign = digits_benign.save(tmp_path / "benign.onnx")
    report = tmp_path / "out" / "trojan.json"
    assert main(["scan", str(trojan), "--report", str(report), "--no-progress"]) == 1
    d = json.loads(report.read_text())  # the gate's report format, kind "scan"
    assert d["format"] == "trojan-gate/report" and d["kind"] == "scan"
    assert d["summary"]["verdict"] == "trojaned" and d["summary"]["is_trojaned"] is True
    assert 3 in d["summary"]["flagged_classes"] and d["findings"][0]["severity"] == "CRITICAL"
    assert {"deviation_factors", "queries", "seconds", "phases"} <= set(d["scan"])
    html = (tmp_path / "out" / "trojan.html").read_text()
    assert "TROJANED" in html and "data:image/png;base64," in html  # deviation chart and trigger grid inline
    assert main(["scan", str(benign), "--report", str(tmp_path / "benign.json"), "--alpha", "0.0455",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "benign.json").read_text())["summary"]["threshold"] == pytest.approx(2.0, abs=1e-4)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["scan", str(bad), "--report", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("option", [{"gradient": "surrogate"}, {"success_rule": "outrank"}, {"heldout_mode": "seed"}])
def test_unknown_options_are_refused_before_any_query(digits_trojan, option):
    """Options the benchmarks rejected left the product: naming one is an error, not a silent default."""
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    with pytest.raises(ValueError, match=next(iter(option))):
        scan(oracle, progress=False, **option)
    assert oracle.queries == 0
