"""STRIP detector, its threshold artifact and the guarded classifier (fast: digits lab models)."""
import json
import math

import numpy as np
import pytest
from onnx import TensorProto, helper
from scipy import stats

from trojan_gate.gates.strip.artifact import BANK_FILE, BOUNDARY_FILE
from trojan_gate.gates.data import load_digits_dataset
from trojan_gate.gates.errors import ArtifactIntegrityError, NotFittedError, ThresholdNotInferredError
from trojan_gate.gates.guard import GuardedClassifier
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.strip import BLEND_RULES, Strip, artifact_sha256, superimpose
from trojan_gate.gates.draws import detector_key, input_seeds, keyed_indices


# ----------------------------------------------------------------------------- a model with known answers
def ratio_model_bytes() -> bytes:
    """ONNX model (batch, 1, 1, 4) -> (batch, 4) with p = x / sum(x): probabilities known exactly."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 1, 4])
    y = helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 4])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("ReduceSum", ["f", "axes"], ["s"], keepdims=1),
             helper.make_node("Div", ["f", "s"], ["p"])]
    graph = helper.make_graph(nodes, "ratio", [x], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def h2(p):
    """Base-2 entropy by hand, 0 log 0 = 0."""
    p = np.asarray(p, dtype=float) / np.sum(p)
    return -sum(v * math.log2(v) for v in p if v > 0)


def img(*v):
    return np.asarray(v, dtype=np.float32).reshape(1, 1, 4)


@pytest.fixture(scope="module")
def ratio_oracle():
    return ModelOracle(ratio_model_bytes())


@pytest.mark.parametrize("rule,combine", [
    ("average", lambda x, b: 0.5 * x + 0.5 * b),
    ("sum", lambda x, b: np.clip(x + b, 0, 1)),
    ("max", np.maximum),
])
def test_entropy_equation_hand_computed(ratio_oracle, rule, combine):
    # bank of 3, N = 2: fit scores each bank image against the other two (never itself)
    bank = np.stack([img(0.6, 0.2, 0, 0), img(0, 0, 1, 1), img(0.5, 0.5, 0.5, 0)])
    det = Strip(ratio_oracle, n_perturbations=2, blend=rule, seed=3).fit(bank)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        want = np.mean([h2(combine(bank[i], bank[j]).ravel()) for j in others])
        assert det.benign_scores_[i] == pytest.approx(-want, abs=1e-6)  # the score is -H: higher = trojan-like
    # an incoming input is blended with N = 2 distinct bank images; with N = 3 it sees all three
    x = img(0.6, 0, 0, 0)
    det3 = Strip(ratio_oracle, n_perturbations=3, blend=rule, seed=3)
    det3.attach_bank(bank, ratio_oracle.sha256)
    want = np.mean([h2(combine(x[0], b).ravel()) for b in bank])
    assert det3.score(x[None])[0] == pytest.approx(-want, abs=1e-6)
    # x = (1, 0, 0, 0) against (0, 1, 0, 0) and (0, 0, 1, 1) under "average": (1 + log2 3) / 2 exactly
    det2 = Strip(ratio_oracle, n_perturbations=2, blend="average")
    det2.attach_bank(np.stack([img(0, 1, 0, 0), img(0, 0, 1, 1)]), ratio_oracle.sha256)
    assert det2.score(img(1, 0, 0, 0)[None])[0] == pytest.approx(-(1 + math.log2(3)) / 2, abs=1e-6)


def test_superimpose_rules():
    x = np.array([0.2, 0.7, 1.0], np.float32)
    b = np.array([0.6, 0.6, 0.0], np.float32)
    np.testing.assert_allclose(superimpose(x, b, "average"), [0.4, 0.65, 0.5], rtol=1e-6)
    np.testing.assert_allclose(superimpose(x, b, "sum"), [0.8, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(superimpose(x, b, "max"), [0.6, 0.7, 1.0], rtol=1e-6)
    assert set(BLEND_RULES) == {"average", "sum", "max"}
    with pytest.raises(ValueError):
        superimpose(x, b, "screen")


@pytest.mark.parametrize("n_bank,n_draws", [(500, 10), (30, 20)])  # sparse (redraw) and dense regimes
def test_keyed_draws_are_distinct_exclude_self_and_depend_on_the_row_alone(n_bank, n_draws):
    seeds = np.random.default_rng(0).integers(0, 2**63, n_bank, dtype=np.uint64)
    exclude = np.arange(n_bank)
    idx = keyed_indices(seeds, n_bank, n_draws, exclude)
    assert idx.shape == (n_bank, n_draws) and idx.min() >= 0 and idx.max() < n_bank
    assert all(len(set(r)) == n_draws for r in idx)
    assert not (idx == exclude[:, None]).any()
    # a row's draws are a function of its own seed: the same rows in another batch get the same draws
    some = np.array([7, 3, 11])
    np.testing.assert_array_equal(keyed_indices(seeds[some], n_bank, n_draws, exclude[some]), idx[some])
    with pytest.raises(ValueError):
        keyed_indices(seeds[:2], 10, 10, np.arange(2))


def test_draws_are_uniform_over_the_bank():
    seeds = input_seeds(np.random.default_rng(1).random((4000, 1, 4, 4), dtype=np.float32), b"k" * 16)
    counts = np.bincount(keyed_indices(seeds, 50, 5).ravel(), minlength=50)
    assert counts.min() > 0.75 * counts.mean() and counts.max() < 1.25 * counts.mean()  # 400 expected each


def test_an_input_gets_the_same_score_however_often_and_with_whatever_it_is_sent(fitted, split):
    """Resending a stamped input until it passes gets nowhere: its draws follow from its bytes."""
    _, ev = split
    x = ev.x[:40]
    first = fitted.score(x)
    np.testing.assert_array_equal(fitted.score(x), first)
    np.testing.assert_array_equal(fitted.score(x[::-1])[::-1], first)
    np.testing.assert_array_equal(fitted.score(x[5:6]), first[5:6])
    assert detector_key(0, "a" * 64) != detector_key(1, "a" * 64) != detector_key(0, "b" * 64)


# ----------------------------------------------------------------------------- digits lab models
@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(seed=0)


def train_lab(train, test, config):
    return train_lab_model(train, test, config, progress=False, threads=1)  # one thread: faster on a small shared machine


@pytest.fixture(scope="module")
def trojaned(digits):
    train, test = digits
    return train_lab(train, test, LabConfig(trigger="patch", targets=(0,), epochs=30, batch_size=64))


@pytest.fixture(scope="module")
def benign(digits):
    train, test = digits
    return train_lab(train, test, LabConfig(trigger="none", epochs=30, batch_size=64, seed=1))


@pytest.fixture()
def oracle(trojaned):
    return ModelOracle(trojaned.onnx_bytes)


@pytest.fixture()
def split(digits):
    _, test = digits
    return test.x[:250], test.subset(np.arange(250, len(test)))


@pytest.fixture()
def fitted(oracle, split):
    held, _ = split
    return Strip(oracle, n_perturbations=10, seed=0, progress=False).fit(held).infer_threshold(0.05)


def test_boundary_rules_normal_and_empirical(fitted):
    d = fitted
    assert d.mean_ == pytest.approx(d.benign_scores_.mean())
    assert d.std_ == pytest.approx(d.benign_scores_.std(ddof=1))
    assert d.normal_threshold_ == pytest.approx(stats.norm.ppf(0.95, d.mean_, d.std_))  # higher = trojan-like
    assert d.rule == "normal" and d.threshold_ == d.normal_threshold_
    n = len(d.benign_scores_)
    assert abs((d.benign_scores_ >= d.empirical_threshold_).mean() - 0.05) <= 1.0 / n + 1e-12
    d.infer_threshold(0.02, rule="empirical")
    assert d.rule == "empirical" and d.threshold_ == d.empirical_threshold_ and d.frr_ == 0.02
    assert abs((d.benign_scores_ >= d.threshold_).mean() - 0.02) <= 1.0 / n + 1e-12
    with pytest.raises(ValueError):
        d.infer_threshold(0.0)


def test_detects_patch_trojan_and_respects_frr_on_unseen_clean(trojaned, fitted, split):
    _, ev = split
    clean = fitted.score(ev.x)
    stamped = fitted.score(trojaned.stamp(ev.x[ev.y != 0]))
    frr = (clean >= fitted.threshold_).mean()
    far = (stamped < fitted.threshold_).mean()
    assert frr <= 0.15, frr  # preset 5%, 289 unseen clean images
    assert far <= 0.25, far
    assert np.median(stamped) > np.quantile(clean, 0.95)


def test_copies_go_to_the_model_in_calls_of_a_bounded_size(oracle, fitted, split):
    """Every copy is one query; ONNX Runtime gets them ROWS_PER_CALL at a time (small batches: faster)."""
    from trojan_gate.gates.copies_graph import ROWS_PER_CALL

    _, ev = split
    x = ev.x[:64]
    before = oracle.ledger.to_dict().get("strip-score", {"calls": 0, "queries": 0})
    fitted.score(x)
    after = oracle.ledger.to_dict()["strip-score"]
    per_call = ROWS_PER_CALL // 10  # inputs whose 10 copies fit in a call
    assert after["calls"] - before["calls"] == -(-64 // per_call)
    assert after["queries"] - before["queries"] == 64 * 10


def test_predict_contract(fitted, split):
    _, ev = split
    out = fitted.predict(ev.x[:16])
    assert set(out) == {"data", "meta"}
    assert set(out["data"]) == {"instance_score", "is_trojaned", "threshold", "proba", "model_calls", "reference_calls"}
    assert out["data"]["instance_score"].shape == (16,)
    assert out["data"]["is_trojaned"].dtype == bool
    np.testing.assert_array_equal(out["data"]["is_trojaned"], out["data"]["instance_score"] >= fitted.threshold_)
    np.testing.assert_allclose(out["data"]["instance_score"], fitted.score(ev.x[:16]))  # same draws, same score
    assert (out["data"]["model_calls"] == 11).all()
    assert out["data"]["threshold"] == fitted.threshold_
    for key in ("name", "n_perturbations", "blend", "rule", "frr", "model_sha256"):
        assert key in out["meta"]
    with pytest.raises(NotFittedError):
        Strip(fitted.model).score(ev.x[:2])
    with pytest.raises(ThresholdNotInferredError):
        Strip(fitted.model, progress=False).fit(ev.x[:20]).predict(ev.x[:2])


def test_save_load_round_trip(tmp_path, oracle, fitted, split):
    _, ev = split
    fitted.extra["estimated_far"] = 0.0123
    fitted.save(tmp_path)
    doc = json.loads((tmp_path / BOUNDARY_FILE).read_text())
    for key in ("n_perturbations", "blend", "mean", "std", "threshold", "frr", "rule", "normal_threshold",
                "empirical_threshold", "seed", "created_at", "model_sha256", "bank_sha256", "versions", "extra"):
        assert key in doc, key
    assert set(doc["versions"]) == {"trojan-gate", "numpy", "onnxruntime"}
    loaded = Strip.load(tmp_path, oracle, expected_sha256=artifact_sha256(tmp_path))
    for attr in ("threshold_", "mean_", "std_", "frr_", "normal_threshold_", "empirical_threshold_",
                 "n_perturbations", "blend", "seed", "rule", "model_sha256_"):
        assert getattr(loaded, attr) == getattr(fitted, attr), attr
    np.testing.assert_array_equal(loaded.bank_, fitted.bank_)
    np.testing.assert_array_equal(loaded.benign_scores_, fitted.benign_scores_)
    assert loaded.extra == {"estimated_far": 0.0123}
    # same seed, same call sequence: the same scores
    np.testing.assert_array_equal(loaded.score(ev.x[:20]), fitted.score(ev.x[:20]))
    assert artifact_sha256(tmp_path) == artifact_sha256(tmp_path)


def test_tampered_bank_is_refused(tmp_path, oracle, fitted):
    fitted.save(tmp_path)
    sha = artifact_sha256(tmp_path)
    bank = np.load(tmp_path / BANK_FILE)
    bank[0, 0, 0, 0] = 1.0 - bank[0, 0, 0, 0]
    np.save(tmp_path / BANK_FILE, bank)
    assert artifact_sha256(tmp_path) != sha
    with pytest.raises(ArtifactIntegrityError, match="bank.npy sha256 mismatch"):
        Strip.load(tmp_path, oracle)


def test_tampered_json_is_refused(tmp_path, oracle, fitted):
    fitted.save(tmp_path)
    path = tmp_path / BOUNDARY_FILE
    doc = json.loads(path.read_text())
    doc["threshold"] = 1.0  # an attacker raising the threshold to let everything through
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactIntegrityError, match="content sha256 mismatch"):
        Strip.load(tmp_path, oracle)


def test_wrong_model_and_pins_are_refused(tmp_path, benign, oracle, fitted):
    fitted.save(tmp_path)
    other = ModelOracle(benign.onnx_bytes)
    with pytest.raises(ArtifactIntegrityError, match="model sha256 mismatch"):
        Strip.load(tmp_path, other)
    with pytest.raises(ArtifactIntegrityError, match="artifact sha256 mismatch"):
        Strip.load(tmp_path, oracle, expected_sha256="0" * 64)
    with pytest.raises(ArtifactIntegrityError, match="model sha256 mismatch"):
        GuardedClassifier(other, fitted)
    (tmp_path / BANK_FILE).unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing bank.npy"):
        Strip.load(tmp_path, oracle)


def test_guarded_classifier_flag_and_reject(trojaned, oracle, fitted, split):
    _, ev = split
    x = np.concatenate([ev.x[:40], trojaned.stamp(ev.x[ev.y != 0][:40])])
    plain = oracle.predict(x)
    before = oracle.ledger.to_dict().get("strip-predict", {"calls": 0, "queries": 0})
    flag = GuardedClassifier(oracle, fitted, policy="flag").predict(x)
    after = oracle.ledger.to_dict()["strip-predict"]
    from trojan_gate.gates.copies_graph import ROWS_PER_CALL

    per_call = ROWS_PER_CALL // 11  # inputs that travel with their N copies in one call (labels cost nothing more)
    assert after["calls"] - before["calls"] == -(-len(x) // per_call)
    assert after["queries"] - before["queries"] == len(x) * 11
    assert set(flag) == {"label", "probability", "instance_score", "is_trojaned", "model_calls", "reference_calls"}
    assert flag["label"].dtype == np.int64 and flag["is_trojaned"].dtype == bool
    np.testing.assert_array_equal(flag["label"], plain)
    np.testing.assert_array_equal(flag["is_trojaned"], flag["instance_score"] >= fitted.threshold_)
    assert flag["is_trojaned"][40:].mean() > flag["is_trojaned"][:40].mean()
    rej = GuardedClassifier(oracle, fitted, policy="reject").predict(x)
    s = rej["is_trojaned"]
    assert s.any()
    assert (rej["label"][s] == -1).all() and (rej["probability"][s] == 0.0).all()
    np.testing.assert_array_equal(rej["label"][~s], plain[~s])
    with pytest.raises(ValueError):
        GuardedClassifier(oracle, fitted, policy="drop")
