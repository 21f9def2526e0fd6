"""The served model's hidden features as evidence: the exposed output, the class-conditional null, refusals."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trojan_gate.gates import ModelOracle
from trojan_gate.gates.errors import ModelLoadError, NotFittedError
from trojan_gate.gates.runtime.activations import ClassFeatureNull, HiddenFeatures, hidden_output_graph


def test_the_exposed_hidden_output_leaves_the_answers_unchanged(digits, digits_trojan):
    _, test = digits
    features = HiddenFeatures(digits_trojan.onnx_bytes)
    proba, h = features(test.x)
    assert np.array_equal(proba, ModelOracle(digits_trojan.onnx_bytes).predict_proba(test.x))
    assert h.shape[0] == len(test.x) and h.ndim == 2 and h.shape[1] > 1
    graph, name = hidden_output_graph(digits_trojan.onnx_bytes)
    assert name == features.output_name and onnx.load_from_string(graph).graph.output[1].name == name


def test_triggered_inputs_lie_far_from_their_class_and_clean_ones_do_not(digits, digits_trojan):
    """The planted patch: 82% of the hijacked inputs fall below the clean 5% quantile (measured)."""
    _, test = digits
    features = HiddenFeatures(digits_trojan.onnx_bytes)
    proba, h = features(test.x)
    labels = proba.argmax(1)
    order = np.random.default_rng(0).permutation(len(test.x))
    fit, cal, clean = order[:270], order[270:400], order[400:]
    null = ClassFeatureNull().fit(h[fit], labels[fit], 10)
    cut = np.quantile(null.statistic(h[cal], labels[cal]), 0.05)
    stamped_proba, stamped_h = features(digits_trojan.stamp(test.x[test.y != 3]))
    hijacked = stamped_proba.argmax(1) == 3
    assert hijacked.mean() > 0.8
    caught = np.mean(null.statistic(stamped_h[hijacked], stamped_proba[hijacked].argmax(1)) < cut)
    false_alarms = np.mean(null.statistic(h[clean], labels[clean]) < cut)
    assert caught > 0.5 and false_alarms < 0.15, (caught, false_alarms)
    again = ClassFeatureNull.from_arrays(null.to_arrays())
    assert np.allclose(again.statistic(h, labels), null.statistic(h, labels))


def test_refusals_name_the_problem():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    relu_only = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(ModelLoadError, match="no Gemm or MatMul"):
        hidden_output_graph(relu_only.SerializeToString())
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    single = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]))
    with pytest.raises(ModelLoadError, match="not a hidden layer"):
        hidden_output_graph(single.SerializeToString())
    with pytest.raises(NotFittedError):
        ClassFeatureNull().statistic(np.zeros((1, 2)), np.zeros(1, int))
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        ClassFeatureNull().fit(np.random.default_rng(0).random((4, 2)), np.array([0, 1, 0, 1]), 3)
    with pytest.raises(ValueError, match="ridge"):
        ClassFeatureNull(ridge=0)
    with pytest.raises(ValueError, match="do not fit together"):
        ClassFeatureNull.from_arrays({"activation_means": np.zeros((3, 2)), "activation_precision": np.eye(3),
                                      "activation_ridge": np.asarray(1e-3)})
