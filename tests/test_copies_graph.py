"""Copies built inside ONNX Runtime (`copies_graph`): the same rows, answers and counts as the numpy copies."""
import numpy as np
import onnx
import pytest

from trojan_gate.gates.copies import KeyedCopies
from trojan_gate.gates.copies_graph import PREFIX, GraphCopies, wrapper_graph
from trojan_gate.gates.guard import GuardedClassifier
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.gates.strip import Strip


@pytest.fixture(scope="module")
def oracle(digits_trojan):
    return ModelOracle(digits_trojan.onnx_bytes)


def _ask_both(oracle, bank, blend, x, idx, with_self):
    graph = KeyedCopies(bank, idx.shape[1], blend, 0, oracle.sha256)
    plain = KeyedCopies(bank, idx.shape[1], blend, 0, oracle.sha256, in_graph=False)
    assert graph.graph_for(oracle).session is not None
    rng = np.random.default_rng(0)
    return graph.ask(oracle, x, idx, rng, with_self), plain.ask(oracle, x, idx, rng, with_self)


@pytest.mark.parametrize("blend", ["max", "sum"])
@pytest.mark.parametrize("with_self", [True, False])
def test_wrapper_answers_equal_numpy_copies(oracle, digits, blend, with_self):
    _, test = digits
    bank, x = test.x[:60], test.x[60:300]
    idx = np.random.default_rng(1).integers(0, len(bank), size=(len(x), 7))
    (gs, gc), (ns, nc) = _ask_both(oracle, bank, blend, x, idx, with_self)
    assert gc.shape == (len(x), 7, oracle.n_classes)
    np.testing.assert_allclose(gc, nc, rtol=0, atol=1e-6)
    if with_self:
        np.testing.assert_allclose(gs, ns, rtol=0, atol=1e-6)
        np.testing.assert_allclose(gs, oracle.predict_proba(x), rtol=0, atol=1e-6)
    else:
        assert gs is None and ns is None


def test_wrapper_counts_every_row_and_splits_calls(oracle, digits):
    _, test = digits
    oracle = ModelOracle(oracle.model_bytes, batch_size=50)
    bank, x = test.x[:40], test.x[40:140]
    copies = KeyedCopies(bank, 4, "max", 0, oracle.sha256)
    idx = copies.draw_indices(x)
    with oracle.phase("t"):
        copies.ask(oracle, x, idx, np.random.default_rng(0))
    stats = oracle.ledger.phases["t"]
    assert stats.queries == 100 * 5  # the inputs and their copies, as the numpy path counts them
    assert stats.calls == 10  # 50 rows per call (the oracle's batch, under ROWS_PER_CALL): 10 inputs, 4 copies each


def test_budget_refuses_a_wrapped_call(oracle, digits):
    _, test = digits
    limited = ModelOracle(oracle.model_bytes, budget=30)
    copies = KeyedCopies(test.x[:20], 5, "max", 0, limited.sha256)
    from trojan_gate.gates.errors import QueryBudgetExceeded

    with pytest.raises(QueryBudgetExceeded):
        copies.ask(limited, test.x[20:40], copies.draw_indices(test.x[20:40]), np.random.default_rng(0))


def test_models_the_wrapper_cannot_mean_the_same_fall_back_to_numpy(oracle, digits):
    _, test = digits
    bank = test.x[:30]
    fixed = onnx.load_from_string(oracle.model_bytes)  # a graph that takes one image per call
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    one = ModelOracle(fixed.SerializeToString())
    assert wrapper_graph(one.model_bytes, one.info, bank, "max") is None
    assert wrapper_graph(oracle.model_bytes, oracle.info, bank, "average") is None  # no neutral image
    named = onnx.load_from_string(oracle.model_bytes)  # a graph that already uses the wrapper's prefix
    named.graph.node[0].output[0], old = PREFIX + "bank", named.graph.node[0].output[0]
    for node in named.graph.node[1:]:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = PREFIX + "bank"
    prefixed = ModelOracle(named.SerializeToString())
    assert wrapper_graph(prefixed.model_bytes, prefixed.info, bank, "max") is None
    for model in (one, prefixed):  # the numpy copies serve them, with the same answers
        copies = KeyedCopies(bank, 3, "max", 0, model.sha256)
        assert copies.graph_for(model).session is None
        x = test.x[30:50]
        p_self, p_copies = copies.ask(model, x, copies.draw_indices(x), np.random.default_rng(0))
        want = oracle.predict_proba(copies.perturb(x)).reshape(20, 3, -1)
        np.testing.assert_allclose(p_copies, want, atol=1e-6)


def test_a_wrapper_that_disagrees_is_not_used(oracle, digits, monkeypatch):
    _, test = digits
    import trojan_gate.gates.copies_graph as cg

    real = cg.wrapper_graph

    def wrong_blend(model_bytes, info, bank, blend, low):  # builds "sum" while "max" is asked
        return real(model_bytes, info, bank, "sum", low)

    monkeypatch.setattr(cg, "wrapper_graph", wrong_blend)
    assert GraphCopies(oracle, KeyedCopies(test.x[:30], 3, "max", 0, oracle.sha256)).session is None


@pytest.mark.parametrize("kind", ["strip", "runtime"])
def test_detectors_score_the_same_in_graph_and_numpy(oracle, digits, kind):
    _, test = digits
    held, x = test.x[:200], test.x[200:]
    if kind == "strip":
        det = Strip(oracle, n_perturbations=6, seed=0, progress=False).fit(held).infer_threshold(0.05)
    else:
        det = RuntimeCheck(oracle, n_perturbations=6, stages=(2,), reference_epochs=5, seed=0, progress=False)
        det.fit(held, test.y[:200]).infer_threshold(0.05)
    assert det.copies_.graph_for(oracle).session is not None
    graph = GuardedClassifier(oracle, det, chunk_size=50).predict(x)
    det.copies_.in_graph = False
    plain = GuardedClassifier(oracle, det).predict(x)
    for key in plain:
        np.testing.assert_allclose(graph[key], plain[key], rtol=0, atol=1e-12, err_msg=key)
    assert (plain["reference_calls"] == (1 if kind == "runtime" else 0)).all()
