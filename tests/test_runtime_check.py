"""The run-time check beyond STRIP (gates.runtime): evidence, calibration, adaptive N, artifact."""
import json
import shutil

import numpy as np
import pytest

from trojan_gate.gates import ModelOracle
from trojan_gate.gates.errors import ArtifactIntegrityError, NotFittedError
from trojan_gate.gates.runtime import (RuntimeCheck, check_artifact_sha256, check_kind, describe, load_check)
from trojan_gate.gates.runtime.check import calibrate, clopper_pearson, leave_one_out_min_p
from trojan_gate.gates.runtime.evidence import copy_statistics, entropy_bits, js_bits


def test_evidence_statistics_follow_their_definitions():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(3, 5))  # 3 inputs, 5 copies, 4 classes
    p_self = rng.dirichlet(np.ones(4), size=3)
    st = copy_statistics(p_self, p)
    h = -(p * np.log2(p)).sum(-1)
    assert np.allclose(st["entropy"], h.mean(1))  # STRIP's Eq. 2-4, in bits
    centroid = p.mean(1)
    def h_bits(q):
        return -(q * np.log2(q)).sum(-1)

    js = h_bits((p + centroid[:, None]) / 2) - 0.5 * (h_bits(p) + h_bits(centroid)[:, None])
    assert np.allclose(st["dispersion"], js.mean(1))  # JS spread around the centroid
    assert np.allclose(js_bits(p_self, p_self), 0) and np.allclose(js_bits(p_self, p[:, 0]), js_bits(p[:, 0], p_self))
    assert js_bits(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)  # disjoint: one bit
    same = np.repeat(np.array([[[0.5, 0.5, 0, 0]]]), 5, axis=1)  # a two-target split on every copy
    st = copy_statistics(np.array([[0.5, 0.5, 0, 0]]), same)
    assert st["entropy"][0] == pytest.approx(1.0) and st["dispersion"][0] == pytest.approx(0.0)
    assert entropy_bits(np.array([0.25] * 4)) == pytest.approx(2.0)


def test_min_p_calibration_leaves_each_image_out_and_bounds_the_frr():
    rng = np.random.default_rng(1)
    values = {10: {"a": rng.normal(size=400), "b": rng.normal(size=400)},
              2: {"a": rng.normal(size=400), "b": rng.normal(size=400)}}
    cal = calibrate(values, 0.05, stages=(2,))
    loo = leave_one_out_min_p(values[10])
    assert cal.threshold == np.quantile(loo, 0.05, method="lower")
    assert cal.realised_frr == pytest.approx((loo <= cal.threshold).mean())
    assert cal.frr_interval[0] <= cal.realised_frr <= cal.frr_interval[1]
    lo, hi = clopper_pearson(4, 400)
    assert lo < 0.01 < hi and clopper_pearson(0, 10)[0] == 0.0
    # an image with the smallest value of a statistic has LOO p-value 1/n, below any other
    assert loo[np.argmin(values[10]["a"])] == pytest.approx(1 / 400)
    assert 2 in cal.stage_bounds and cal.stage_bounds[2] >= cal.threshold


@pytest.fixture(scope="module")
def fitted(digits, digits_trojan, tmp_path_factory):
    _, test = digits
    model = digits_trojan.save(tmp_path_factory.mktemp("rc") / "m.onnx")
    oracle = ModelOracle(model)
    det = RuntimeCheck(oracle, n_perturbations=10, statistics=("entropy", "reference"), seed=0, progress=False)
    det.fit(test.x[:300], test.y[:300]).infer_threshold(0.05)  # the copies' path: entropy beside the student
    return det, oracle, model, test


def test_fit_infer_threshold_predict_follow_the_detector_contract(fitted, digits_trojan):
    det, oracle, _, test = fitted
    assert det.threshold_ is not None and len(det.bank_) == 150  # half trains the reference
    x = test.x[300:]
    victims = np.flatnonzero(test.y[300:] != 3)
    out = det.predict(x)
    assert set(out) == {"data", "meta"} and set(out["data"]) >= {"instance_score", "is_trojaned", "threshold"}
    assert out["meta"]["statistics"] == ["entropy", "reference"] and out["meta"]["frr"] == 0.05
    assert np.array_equal(out["data"]["is_trojaned"], out["data"]["instance_score"] >= det.threshold_)
    assert det.threshold_ == -det.calibration_.threshold  # the score is -min p: higher = trojan-like
    stamped = digits_trojan.stamp(x[victims])
    stamped = stamped[oracle.predict(stamped) == 3]  # the trigger-stamped inputs that hijack the model
    flagged = det.predict(stamped)["data"]["is_trojaned"].mean()
    assert det.reference_agreement_ >= 0.85  # the student answers clean images as the model does
    assert flagged >= 0.9 and out["data"]["is_trojaned"].mean() <= 0.15, (flagged, out["data"]["is_trojaned"].mean())
    assert det.predict(x)["data"]["instance_score"].tolist() == out["data"]["instance_score"].tolist()  # keyed


def test_adaptive_n_asks_fewer_copies_and_decides_like_full_n(fitted, digits_trojan):
    det, _, _, test = fitted
    x = test.x[300:]
    adaptive, full = det.predict(x, adaptive=True)["data"], det.predict(x, adaptive=False)["data"]
    assert (full["model_calls"] == 11).all() and adaptive["model_calls"].mean() < 11  # the input + its copies
    assert np.array_equal(adaptive["proba"], full["proba"])  # labels come from the first call either way
    assert (adaptive["is_trojaned"] == full["is_trojaned"]).mean() >= 0.97
    stamped = digits_trojan.stamp(x[test.y[300:] != 3])
    assert det.predict(stamped)["data"]["model_calls"].mean() > adaptive["model_calls"].mean()  # suspects: full N


def test_the_artifact_round_trips_and_refuses_tampering(fitted, tmp_path):
    det, oracle, model, test = fitted
    path = det.save(tmp_path / "check")
    assert check_kind(path) == "runtime"
    digest = check_artifact_sha256(path)
    again = load_check(path, ModelOracle(model), expected_sha256=digest)
    assert isinstance(again, RuntimeCheck) and again.threshold_ == det.threshold_
    x = test.x[300:340]
    assert again.predict(x)["data"]["instance_score"].tolist() == det.predict(x)["data"]["instance_score"].tolist()
    assert describe(again)["kind"] == "runtime" and describe(again)["frr_interval"] == list(det.calibration_.frr_interval)

    def broken(edit):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(path, bad)
        edit(bad)
        return bad

    doc_edit = broken(lambda d: (d / "check.json").write_text(
        json.dumps({**json.loads((d / "check.json").read_text()), "threshold": 1.0})))
    with pytest.raises(ArtifactIntegrityError, match="modified"):
        load_check(doc_edit, oracle)
    ref_edit = broken(lambda d: (d / "reference.onnx").write_bytes((d / "reference.onnx").read_bytes() + b"\0"))
    with pytest.raises(ArtifactIntegrityError, match="reference.onnx"):
        load_check(ref_edit, oracle)
    no_bank = broken(lambda d: (d / "bank.npy").unlink())
    with pytest.raises(ArtifactIntegrityError, match="bank.npy is missing"):
        load_check(no_bank, oracle)
    not_object = broken(lambda d: (d / "check.json").write_text("[1, 2]"))
    with pytest.raises(ArtifactIntegrityError, match="not a JSON object"):
        load_check(not_object, oracle)

    def drop_field(d):  # an attacker who re-hashes the document: a missing field is refused by name, no crash
        from trojan_gate.gates.artifact_files import content_sha256

        doc = json.loads((d / "check.json").read_text())
        del doc["stage_bounds"]
        doc["integrity"] = {"content_sha256": content_sha256(doc)}
        (d / "check.json").write_text(json.dumps(doc))

    with pytest.raises(ArtifactIntegrityError, match="lacks or mangles a field"):
        load_check(broken(drop_field), oracle)
    extra = broken(lambda d: (d / "boundary.json").write_text("{}"))
    with pytest.raises(ArtifactIntegrityError, match="exactly one"):
        load_check(extra, oracle)
    with pytest.raises(ArtifactIntegrityError, match="do not hash"):
        load_check(path, oracle, expected_sha256="0" * 64)


def test_the_check_refuses_another_model_and_bad_settings(fitted, digits_benign, tmp_path):
    det, oracle, _, test = fitted
    path = det.save(tmp_path / "check")
    with pytest.raises(ArtifactIntegrityError, match="another model"):
        load_check(path, ModelOracle(digits_benign.save(tmp_path / "other.onnx")))
    with pytest.raises(ValueError, match="unknown statistic"):
        RuntimeCheck(oracle, statistics=("entropy", "vibes"))
    with pytest.raises(ValueError, match="too few"):
        RuntimeCheck(oracle, statistics=("entropy",), progress=False).fit(test.x[:20], test.y[:20])
    with pytest.raises(NotFittedError, match="not fitted"):
        RuntimeCheck(oracle).predict(test.x[:2])


def test_the_student_is_distilled_from_one_answer_per_image_and_ignores_overlays(digits, digits_trojan, tmp_path):
    import torch

    from trojan_gate.gates.runtime.student import augment, distil_student

    _, test = digits
    oracle = ModelOracle(digits_trojan.save(tmp_path / "m.onnx"))
    x = test.x[:160]
    student = ModelOracle(distil_student(oracle, x, epochs=30, seed=0))
    # "source" labels: the model is asked once per held-out image, never about an augmented one
    assert oracle.ledger.to_dict()["check-fit"]["queries"] == len(x)
    agree = (student.predict(test.x[160:]) == oracle.predict(test.x[160:])).mean()
    assert agree >= 0.85, agree
    # the targets of a batch do not depend on the overlays: same draws with and without them
    xb, tb = torch.from_numpy(x[:64]), torch.from_numpy(oracle.predict_proba(x[:64]).astype(np.float32))
    pool = xb[:8]
    nat0, seen0, t0 = augment(xb, tb, torch.Generator().manual_seed(3), pool, 0.0)
    nat1, seen1, t1 = augment(xb, tb, torch.Generator().manual_seed(3), pool, 1.0)
    assert torch.equal(t0, t1) and torch.equal(nat0, nat1) and torch.equal(seen0, nat0)
    assert not torch.equal(seen1, nat1) and float(seen1.min()) >= 0.0 and float(seen1.max()) <= 1.0
    assert torch.allclose(t1.sum(1), torch.ones(64))  # mixup / cutmix mix probability vectors
    with pytest.raises(ValueError, match="overlay_share"):
        distil_student(oracle, x, overlay_share=1.5)
    with pytest.raises(ValueError, match="too few to distil"):
        distil_student(oracle, x[:3])


def test_a_student_needs_no_labels_and_a_labels_reference_does(digits, digits_trojan, tmp_path):
    _, test = digits
    oracle = ModelOracle(digits_trojan.save(tmp_path / "m.onnx"))
    det = RuntimeCheck(oracle, n_perturbations=4, stages=(), reference_epochs=20, seed=0, progress=False)
    det.fit(test.x[:200]).infer_threshold(0.05)  # no labels
    assert det.describe()["reference_training"] == "student" and 0.0 <= det.reference_agreement_ <= 1.0
    again = RuntimeCheck.load(det.save(tmp_path / "c"), oracle)
    assert again.reference_training == "student"
    with pytest.raises(ValueError, match="needs labelled held-out images"):
        RuntimeCheck(oracle, reference_training="labels", progress=False).fit(test.x[:200])
    with pytest.raises(ValueError, match="reference_training must be one of"):
        RuntimeCheck(oracle, reference_training="oracle")


def test_weights_split_the_frr_budget_and_equal_weights_are_the_plain_min_p():
    from trojan_gate.gates.runtime.check import check_weights, weighted_min

    p = np.array([[0.02, 0.5], [0.5, 0.02], [0.3, 0.4]])
    assert weighted_min(p, ["entropy", "reference"], None).tolist() == [0.02, 0.02, 0.3]
    assert weighted_min(p, ["entropy", "reference"], {"entropy": 1, "reference": 1}).tolist() == [0.02, 0.02, 0.3]
    w = weighted_min(p, ["entropy", "reference"], {"entropy": 0.1, "reference": 0.9})
    assert w == pytest.approx([0.1, 0.02 / 1.8, 0.4 / 1.8])  # p / (S w): entropy's small p counts for less
    rng = np.random.default_rng(2)
    values = {10: {"entropy": rng.normal(size=500), "reference": rng.normal(size=500)}}
    plain, equal = calibrate(values, 0.02, ()), calibrate(values, 0.02, (), weights={"entropy": 2, "reference": 2})
    assert plain.threshold == equal.threshold and plain.realised_frr == equal.realised_frr
    tilted = calibrate(values, 0.02, (), weights={"entropy": 0.1, "reference": 0.9})
    assert tilted.realised_frr <= 0.02 + 1 / 500
    with pytest.raises(ValueError, match="positive weight"):
        check_weights({"entropy": 1.0}, ("entropy", "reference"))
    with pytest.raises(ValueError, match="positive weight"):
        check_weights({"entropy": 0.0, "reference": 1.0}, ("entropy", "reference"))


def test_a_weighted_check_round_trips(fitted, tmp_path):
    det, oracle, model, test = fitted
    w = RuntimeCheck(oracle, n_perturbations=10, statistics=("entropy", "reference"), reference=det.reference_bytes_,
                     weights={"entropy": 0.1, "reference": 0.9}, seed=0, progress=False).fit(test.x[150:300], test.y[150:300]).infer_threshold(0.05)
    again = RuntimeCheck.load(w.save(tmp_path / "w"), ModelOracle(model))
    assert again.weights == {"entropy": 0.1, "reference": 0.9} and again.describe()["weights"] == again.weights
    x = test.x[300:360]
    assert again.predict(x)["data"]["instance_score"].tolist() == w.predict(x)["data"]["instance_score"].tolist()
