"""One contract suite over every run-time detector (scikit-learn's `check_estimator` habit).

Each detector in DETECTORS must: keep its parameters in `__init__` and learn in `fit` (which returns
self), refuse to score before `fit` (NotFittedError) and to decide before `infer_threshold`
(ThresholdNotInferredError), return the same `predict` template, score higher for more trojan-like
inputs (stamped inputs above clean ones; flagged exactly at score >= threshold), keep the preset
FRR on its own benign scores, give the same scores after save / load, and serve through the guard.
"""
import inspect

import numpy as np
import pytest

from trojan_gate.gates import ModelOracle
from trojan_gate.gates.detector_base import SCORE_DIRECTION, RuntimeDetector
from trojan_gate.gates.errors import NotFittedError, ThresholdNotInferredError, TrojanGateError
from trojan_gate.gates.guard import GuardedClassifier
from trojan_gate.gates.runtime import RuntimeCheck, load_check
from trojan_gate.gates.strip import Strip

DETECTORS = {"strip": Strip, "runtime": RuntimeCheck}
TARGET = 3  # the digits trojan's target (conftest)


@pytest.fixture(scope="module")
def setting(digits, digits_trojan, tmp_path_factory):
    _, test = digits
    oracle = ModelOracle(digits_trojan.save(tmp_path_factory.mktemp("contract") / "m.onnx"))
    x = test.x[300:]
    stamped = digits_trojan.stamp(x[test.y[300:] != TARGET])
    stamped = stamped[oracle.predict(stamped) == TARGET]
    return oracle, test.x[:300], test.y[:300], x, stamped


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def fitted(request, setting):
    oracle, hx, hy, _, _ = setting
    det = DETECTORS[request.param](oracle, seed=0, progress=False)
    assert det.fit(hx, hy) is det
    assert det.infer_threshold(0.05) is det
    return det


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_init_stores_parameters_and_errors_are_typed(name, setting):
    oracle, hx, hy, x, _ = setting
    cls = DETECTORS[name]
    assert issubclass(cls, RuntimeDetector)
    det = cls(oracle, seed=7, progress=False)
    for p in inspect.signature(cls.__init__).parameters:
        if p not in ("self", "model"):
            assert hasattr(det, p), p  # every parameter kept under its own name
    assert det.meta()["score_direction"] == SCORE_DIRECTION  # meta never raises, fitted or not
    with pytest.raises(NotFittedError):
        det.score(x[:2])
    with pytest.raises(NotFittedError):
        det.predict(x[:2])
    det.fit(hx, hy)
    with pytest.raises(ThresholdNotInferredError):
        det.predict(x[:2])
    with pytest.raises(ThresholdNotInferredError):
        det.save("never-written")
    assert issubclass(NotFittedError, TrojanGateError) and issubclass(ThresholdNotInferredError, TrojanGateError)


def test_predict_fills_one_template_and_scores_higher_for_trojans(fitted, setting):
    oracle, _, _, x, stamped = setting
    out = fitted.predict(x)
    assert set(out) == {"data", "meta"}
    data = out["data"]
    assert set(data) == {"instance_score", "is_trojaned", "threshold", "proba", "model_calls", "reference_calls"}
    n = len(x)
    assert data["instance_score"].shape == (n,) and data["is_trojaned"].dtype == bool
    assert data["proba"].shape == (n, oracle.n_classes) and data["model_calls"].shape == (n,)
    np.testing.assert_array_equal(data["is_trojaned"], data["instance_score"] >= fitted.threshold_)
    np.testing.assert_array_equal(data["proba"].argmax(1), oracle.predict(x))  # labels from the same calls
    assert (data["model_calls"] >= 1).all() and (data["model_calls"] <= fitted.n_perturbations + 1).all()
    assert isinstance(fitted.score(x), np.ndarray) and fitted.score(x).shape == (n,)
    s = fitted.predict(stamped)["data"]
    assert np.median(s["instance_score"]) > np.median(data["instance_score"])  # one direction: higher = trojan
    assert s["is_trojaned"].mean() >= 0.8 and data["is_trojaned"].mean() <= 0.15
    assert out["meta"]["score_direction"] == SCORE_DIRECTION and out["meta"]["frr"] == 0.05


def test_threshold_keeps_the_preset_frr_on_its_benign_scores(fitted):
    b = np.asarray(fitted.benign_scores_)
    assert abs((b >= fitted.threshold_).mean() - 0.05) <= 0.05  # normal fit or leave-one-out quantile
    d = fitted.describe()
    assert d["kind"] == fitted.kind and d["threshold"] == fitted.threshold_ and d["score_direction"] == SCORE_DIRECTION


def test_save_load_gives_the_same_scores_and_guard_serves_it(fitted, setting, tmp_path):
    oracle, _, _, x, stamped = setting
    fitted.save(tmp_path / "artifact")
    again = load_check(tmp_path / "artifact", oracle)
    assert type(again) is type(fitted) and again.threshold_ == fitted.threshold_
    np.testing.assert_array_equal(again.score(x[:40]), fitted.score(x[:40]))
    guard = GuardedClassifier(oracle, again, policy="reject")
    mixed = np.concatenate([x[:20], stamped[:20]])
    g, p = guard.predict(mixed), again.predict(mixed)["data"]
    np.testing.assert_array_equal(g["instance_score"], p["instance_score"])
    np.testing.assert_array_equal(g["label"][g["is_trojaned"]], -1)
    np.testing.assert_array_equal(g["model_calls"], p["model_calls"])


def test_an_artifact_of_the_old_score_direction_is_refused_by_name(fitted, setting, tmp_path):
    """Format 2 (STRIP) / 1 (run-time check) scored the other way: re-hashed or not, they are refused."""
    import json

    from trojan_gate.gates.artifact_files import content_sha256
    from trojan_gate.gates.errors import ArtifactIntegrityError

    oracle = setting[0]
    fitted.save(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.suffix == ".json")
    doc = json.loads(path.read_text())
    doc["format_version"] -= 1
    doc["integrity"] = {"content_sha256": content_sha256(doc)}
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactIntegrityError, match=r"format version \d.*higher for more trojan-like"):
        load_check(tmp_path, oracle)
