"""The activation statistic inside the run-time check: no extra model call, the planted trigger caught,
the artifact signed and refused when tampered, a model without a dense layer refused by name."""
import json
import shutil

import numpy as np
import pytest

from trojan_gate.gates import ModelOracle
from trojan_gate.gates.errors import ArtifactIntegrityError, ModelLoadError, ModelOutputError
from trojan_gate.gates.runtime import RuntimeCheck, check_artifact_sha256, load_check
from trojan_gate.gates.runtime.activations import ClassFeatureNull


@pytest.fixture(scope="module")
def with_activation(digits, digits_trojan, tmp_path_factory):
    _, test = digits
    model = digits_trojan.save(tmp_path_factory.mktemp("act") / "m.onnx")
    oracle = ModelOracle(model)
    det = RuntimeCheck(oracle, statistics=("entropy", "reference", "activation"), seed=0, progress=False)
    det.fit(test.x[:300], test.y[:300]).infer_threshold(0.05)
    return det, oracle, model, test


def test_the_inputs_own_call_carries_its_features(with_activation):
    det, oracle, _, test = with_activation
    x = test.x[300:]
    before = oracle.queries
    out = det.predict(x)["data"]
    assert oracle.queries - before == out["model_calls"].sum()  # the features cost no call beyond the input's own
    assert np.array_equal(out["proba"], oracle.predict_proba(x))  # the answers are the model's own
    assert out["model_calls"].min() >= 2 and out["model_calls"].max() <= 11
    full = det.predict(x, adaptive=False)["data"]
    assert (full["model_calls"] == 11).all()


def test_the_activation_statistic_catches_the_planted_trigger_alone(digits, digits_trojan, with_activation):
    _, oracle, _, test = with_activation
    alone = RuntimeCheck(oracle, statistics=("activation",), seed=0, progress=False)
    alone.fit(test.x[:300], test.y[:300]).infer_threshold(0.05)
    assert len(alone.bank_) == 150 and alone.reference_bytes_ is None  # half fits the class means, half calibrates
    x = test.x[300:]
    stamped = digits_trojan.stamp(x[test.y[300:] != 3])
    stamped = stamped[oracle.predict(stamped) == 3]
    caught = alone.predict(stamped)["data"]["is_trojaned"].mean()
    false_alarms = alone.predict(x)["data"]["is_trojaned"].mean()
    assert caught >= 0.5 and false_alarms <= 0.15, (caught, false_alarms)  # measured: 82% below the clean 5% cut
    given = RuntimeCheck(oracle, statistics=("activation",), seed=0, progress=False,
                         activation_null=alone.activation_null_).fit(test.x[:300]).infer_threshold(0.05)
    assert len(given.bank_) == 300  # a fitted null given: the whole held-out set calibrates


def test_the_artifact_round_trips_and_refuses_tampered_features(with_activation, tmp_path):
    det, oracle, model, test = with_activation
    path = det.save(tmp_path / "check")
    assert (path / "activation.npz").is_file()
    digest = check_artifact_sha256(path)
    again = load_check(path, ModelOracle(model), expected_sha256=digest)
    x = test.x[300:340]
    assert again.predict(x)["data"]["instance_score"].tolist() == det.predict(x)["data"]["instance_score"].tolist()
    assert again.describe()["statistics"] == ["entropy", "reference", "activation"]

    def broken(edit):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(path, bad)
        edit(bad)
        return bad

    def shift_means(d):  # a moved class mean would let a trigger's features pass as clean
        with np.load(d / "activation.npz") as a:
            arrays = {k: a[k] for k in a.files}
        arrays["activation_means"] = arrays["activation_means"] + 1.0
        with (d / "activation.npz").open("wb") as f:
            np.savez(f, **arrays)

    with pytest.raises(ArtifactIntegrityError, match="activation.npz was modified"):
        load_check(broken(shift_means), oracle)
    with pytest.raises(ArtifactIntegrityError, match="activation.npz was modified"):
        load_check(broken(lambda d: (d / "activation.npz").unlink()), oracle)

    def rehashed_bad_shape(d):  # an attacker who re-hashes everything: wrong class count is refused by name
        from trojan_gate.gates.artifact_files import content_sha256
        from trojan_gate.gates.hashing import sha256_file

        with np.load(d / "activation.npz") as a:
            arrays = {k: a[k] for k in a.files}
        arrays["activation_means"] = arrays["activation_means"][:4]
        with (d / "activation.npz").open("wb") as f:
            np.savez(f, **arrays)
        doc = json.loads((d / "check.json").read_text())
        doc["activation_sha256"] = sha256_file(d / "activation.npz")
        del doc["integrity"]
        doc["integrity"] = {"content_sha256": content_sha256(doc)}
        (d / "check.json").write_text(json.dumps(doc))

    with pytest.raises(ArtifactIntegrityError, match="4 class means for a model of 10 classes"):
        load_check(broken(rehashed_bad_shape), oracle)


def test_features_of_another_width_and_models_without_a_dense_layer_are_refused(with_activation, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    det, _, _, _ = with_activation
    null = det.activation_null_
    with pytest.raises(ModelOutputError, match="do not match"):
        null.statistic(np.zeros((2, null.means_.shape[1] + 1)), np.zeros(2, int))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ClassFeatureNull.from_arrays({**null.to_arrays(), "activation_means": null.means_ * np.nan})
    # a classifier without Gemm/MatMul (flatten, then a 1x1-free ReduceMean head): no hidden layer to read
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
                               helper.make_node("Softmax", ["m"], ["y"], axis=1)], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "no-dense.onnx"
    onnx.save(model, path)
    oracle = ModelOracle(path)
    with pytest.raises(ModelLoadError, match="no Gemm or MatMul"):
        oracle.proba_and_hidden(np.zeros((2, 1, 8, 8), np.float32))


def test_a_model_without_a_dense_layer_gets_the_check_without_activations_and_says_so(digits, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from trojan_gate.gates.data import Dataset
    from trojan_gate.gates.runtime import calibrate_check

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
                               helper.make_node("Softmax", ["m"], ["y"], axis=1)], "g", [x], [y])
    path = tmp_path / "no-dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    oracle = ModelOracle(path)
    _, test = digits
    heldout = Dataset(test.x[:400], test.y[:400] % 8)
    det = calibrate_check(oracle, heldout, statistics=("entropy", "activation"), frr=0.05)
    assert det.statistics == ("entropy",) and det.describe()["activation"].startswith("not used: the model has no Gemm")
    det = calibrate_check(oracle, heldout, statistics=("reference", "activation"), frr=0.05)
    assert det.statistics == ("entropy", "reference") and "entropy, reference decide instead" in det.describe()["activation"]
    with pytest.raises(ModelLoadError, match="no Gemm or MatMul"):
        calibrate_check(oracle, heldout, statistics=("activation",), frr=0.05)


def test_the_default_check_asks_the_model_once_per_input(with_activation, digits_trojan):
    from trojan_gate.gates.runtime.check import DEFAULT_STATISTICS

    _, oracle, _, test = with_activation
    det = RuntimeCheck(oracle, seed=0, progress=False).fit(test.x[:300], test.y[:300]).infer_threshold(0.05)
    assert det.statistics == DEFAULT_STATISTICS == ("reference", "activation") and det.stages == ()
    x = test.x[300:]
    before = oracle.queries
    out = det.predict(x)["data"]
    assert (out["model_calls"] == 1).all() and oracle.queries - before == len(x)  # no superimposed copies
    assert (out["reference_calls"] == 1).all() and np.array_equal(out["proba"], oracle.predict_proba(x))
    stamped = digits_trojan.stamp(x[test.y[300:] != 3])
    stamped = stamped[oracle.predict(stamped) == 3]
    caught, false_alarms = det.predict(stamped)["data"]["is_trojaned"].mean(), out["is_trojaned"].mean()
    assert caught >= 0.9 and false_alarms <= 0.15, (caught, false_alarms)
    assert np.array_equal(det.predict(x, adaptive=False)["data"]["instance_score"], out["instance_score"])
