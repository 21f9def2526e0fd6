"""The reachable-margin search (gates/metascan/margins.py) against margins known by hand."""
import numpy as np
import pytest

from trojan_gate.gates.metascan.margins import ReachableMargins, margins, relative


def linear_model(weights: np.ndarray, bias: np.ndarray):
    """predict_proba of a softmax-linear model on (n, 1, 4, 4) inputs, counting its queries."""
    calls = {"queries": 0}

    def predict(x):
        calls["queries"] += len(x)
        z = x.reshape(len(x), -1).astype(np.float64) @ weights.T + bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    return predict, calls


def test_margins_are_log_p_k_minus_the_best_other_class():
    log_p = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    m = margins(log_p)
    assert m[0] == pytest.approx([np.log(0.7 / 0.2), np.log(0.2 / 0.7), np.log(0.1 / 0.7)])
    assert m[1] == pytest.approx([np.log(0.1 / 0.8), np.log(0.1 / 0.8), np.log(0.8 / 0.1)])
    assert relative(np.array([1.0, 2.0, 4.0])) == pytest.approx([0.5, 1.0, 2.0])
    assert relative(np.array([-1.0, 0.0, 0.05])) == pytest.approx([-10.0, 0.0, 0.5])  # median floored at 0.1


def test_the_search_reaches_the_margin_a_two_class_linear_model_allows():
    rng = np.random.default_rng(3)
    w = rng.normal(0.0, 1.0, (2, 16))
    b = np.array([0.5, -0.5])
    predict, calls = linear_model(w, b)
    probe = ReachableMargins(steps=150, pairs=8, restarts=2, resolution=14, seed=0)
    r = probe.measure(predict, (1, 4, 4), 2)
    # for two classes, r_0 = max_x (w0 - w1) . x + (b0 - b1) over [0, 1]^16: every positive coordinate on
    d = w[0] - w[1]
    exact = np.array([np.clip(d, 0, None).sum() + (b[0] - b[1]), np.clip(-d, 0, None).sum() + (b[1] - b[0])])
    assert r == pytest.approx(exact, rel=0.05)
    assert (r <= exact + 1e-9).all()  # a reachable margin cannot beat the true maximum
    assert calls["queries"] == probe.queries(2) == 2 * 2 * 150 * 17
    again = ReachableMargins(steps=150, pairs=8, restarts=2, seed=0).measure(linear_model(w, b)[0], (1, 4, 4), 2)
    assert again == pytest.approx(r)  # seeded: the same model gets the same margins


def test_a_planted_shortcut_stands_out_against_benign_models_of_the_same_family():
    """Ten-class linear models: a 'trojaned' one has a strong weight patch for class 3 (a shortcut)."""
    probe = ReachableMargins(steps=60, pairs=8, restarts=2, seed=1)

    def model(seed, shortcut):
        rng = np.random.default_rng(seed)
        w = rng.normal(0.0, 0.3, (10, 16))
        if shortcut:
            w[3, :4] += 4.0
        return probe.measure(linear_model(w, np.zeros(10))[0], (1, 4, 4), 10)

    rho = relative(np.array([model(s, False) for s in range(8)]))
    mean, sd = rho.mean(0), rho.std(0, ddof=1)
    z_trojan = (relative(model(100, True)) - mean) / sd
    z_benign = (relative(model(101, False)) - mean) / sd
    assert int(np.argmax(z_trojan)) == 3 and z_trojan[3] > 3.0
    assert z_trojan.max() > z_benign.max() + 2.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        ReachableMargins(steps=0).measure(lambda x: np.full((len(x), 2), 0.5), (1, 4, 4), 2)


def test_a_calibration_saved_before_the_margin_rule_loads_and_names_targets_by_class_p_values():
    """The committed benchmark calibration has no margin null: it still loads, and says which rule it uses."""
    from pathlib import Path

    from trojan_gate.gates.metascan import load_calibration

    cal = load_calibration(Path(__file__).parent.parent / "benchmarks" / "detection-recipes-calibration")
    assert cal.margin_null_ is None and cal.margin_shadows == 0
    above = cal.threshold_ + 1.0
    trojaned, flagged, _, p_t = cal._decide(above, cal.class_null_.max(axis=0) + 1.0)
    assert trojaned and flagged == sorted(set(np.flatnonzero(p_t <= cal.class_alpha).tolist()) | {int(np.argmin(p_t))})


def test_the_margin_rule_names_the_strongest_class_and_every_class_above_its_threshold():
    from trojan_gate.gates.metascan import ScanCalibration

    cal = ScanCalibration(margin_shadows=10)
    cal.null_, cal.threshold_ = np.array([0.0, 1.0]), 1.0
    cal.class_null_ = np.zeros((2, 5))
    cal.margin_threshold_ = 3.0
    z = np.array([0.5, 2.0, 4.0, 3.5, -1.0])
    assert cal._decide(2.0, np.zeros(5), z)[:2] == (True, [2, 3])
    assert cal._decide(2.0, np.zeros(5), np.array([0.5, 2.0, 1.0, 0.0, -1.0]))[:2] == (True, [1])  # strongest only
    assert cal._decide(0.5, np.zeros(5), z)[:2] == (False, [])  # targets only for a flagged model
