"""Reference-normalised DeepInspect test: benign reference models trained on held-out data."""
import json

import numpy as np
import pytest

from trojan_gate.gates.deepinspect.anomaly import double_mad_test, left_deviation_factors
from trojan_gate.gates.data import Dataset
from trojan_gate.gates.errors import DataValidationError
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.deepinspect.reference import normalised_levels, split_heldout
from helpers import scan

pytestmark = pytest.mark.slow


def test_normalised_level_is_log_ratio_to_the_geometric_mean_of_the_references():
    refs = [[1.0, 4.0, 8.0], [4.0, 4.0, 2.0]]  # geometric means 2, 4, 4
    r = normalised_levels([1.0, 4.0, 8.0], refs)
    assert r == pytest.approx([np.log(0.5), 0.0, np.log(2.0)])


def test_a_class_easy_for_every_model_cancels_out():
    refs = np.array([[10.0, 50, 50, 50, 50, 50], [12.0, 60, 40, 55, 45, 50]])
    benign = np.array([11.0, 52, 47, 53, 49, 51])  # class 0 is naturally easy
    assert double_mad_test(np.log(benign), 2.0).flagged == [0]  # the plain test flags it
    assert double_mad_test(normalised_levels(benign, refs), 2.0, min_mad=0.15).flagged == []


def test_mad_floor_hand_computed():
    s = [-0.3, 0.0, 0.01, 0.02, 0.03]  # median 0.01; left deviations 0.31, 0.01 -> median 0.16
    df, m, mad = left_deviation_factors(s)
    assert m == pytest.approx(0.01) and mad == pytest.approx(1.4826 * 0.16)
    assert df[0] == pytest.approx(0.31 / (1.4826 * 0.16))
    floored, _, mad2 = left_deviation_factors(s, min_mad=0.5)
    assert mad2 == pytest.approx(mad) and floored[0] == pytest.approx(0.31 / 0.5)
    with pytest.raises(ValueError, match="min_mad"):
        double_mad_test(s, 2.0, min_mad=-1.0)


def test_split_keeps_substitute_and_reference_images_apart(digits):
    _, test = digits
    sub, ref = split_heldout(test, 5, 10, seed=3)
    assert np.bincount(sub.y, minlength=10).tolist() == [5] * 10
    assert len(sub) + len(ref) == len(test)
    flat_sub = {img.tobytes() for img in sub.x}
    assert not any(img.tobytes() in flat_sub for img in ref.x)


@pytest.fixture(scope="module")
def held_scans(digits, digits_trojan, digits_benign):
    _, test = digits
    return {name: scan(m.onnx_bytes, heldout=test, seed=0, progress=False)
            for name, m in (("trojan", digits_trojan), ("benign", digits_benign))}


def test_normalised_scan_flags_only_the_target_and_passes_the_benign_model(held_scans, digits):
    t, b = held_scans["trojan"], held_scans["benign"]
    assert t.flagged_classes == [3]
    assert b.flagged_classes == [] and not b.is_trojaned
    _, test = digits
    for r in (t, b):
        ref = r.config["reference"]
        assert ref["models"] == 3 and ref["train_images"] == len(test) - 10 * 20
        assert np.asarray(r.reference_statistics).shape == (3, 10)
        assert r.phases["reference"]["queries"] == 0 and r.phases["reference"]["reference_queries"] > 0
        tested = normalised_levels(r.statistics, r.reference_statistics)  # what the test saw
        assert r.median == pytest.approx(float(np.median(tested)))
    d = json.loads(json.dumps(t.to_dict()))
    assert len(d["reference_statistics"]) == 3


def test_reference_queries_never_reach_the_scanned_model(digits, digits_trojan):
    _, test = digits
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    r = scan(oracle, heldout=test, seed=1, progress=False, generator_steps=20, n_per_class=5,
             reference_models=1, support_ladder=(4,))
    assert r.config["reference"]["queries"] > 0  # the reference model was queried ...
    # ... never through this oracle (with references the co-target links are always measured)
    assert set(oracle.ledger.phases) == {"inversion", "generator", "statistics", "co-targets"}
    assert oracle.queries == r.queries == sum(oracle.ledger.phases[p].queries for p in oracle.ledger.phases)
    plain = scan(ModelOracle(digits_trojan.onnx_bytes), heldout=test, seed=1, progress=False,
                 generator_steps=20, n_per_class=5, reference_models=0, support_ladder=(4,))
    assert plain.reference_statistics is None and plain.config["reference"] is None
    assert "reference" not in plain.phases


def test_too_little_heldout_data_for_the_references_is_refused_before_any_query(digits, digits_trojan):
    _, test = digits
    keep = np.concatenate([np.flatnonzero(test.y == c)[:25] for c in range(10)])
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    with pytest.raises(DataValidationError, match="reference models need at least 10"):
        scan(oracle, heldout=Dataset(test.x[keep], test.y[keep]), progress=False)
    assert oracle.queries == 0
