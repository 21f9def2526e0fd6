"""ModelOracle: counted, per-phase, budgeted, validating query access."""
import numpy as np
import pytest

from trojan_gate.gates.errors import InputShapeError, ModelLoadError, QueryBudgetExceeded
from trojan_gate.gates.architectures import SmallCNN
from trojan_gate.gates.classifier_training import export_onnx
from trojan_gate.gates.oracle import ModelOracle


@pytest.fixture(scope="module")
def onnx_bytes():
    import torch

    torch.manual_seed(0)
    return export_onnx(SmallCNN((1, 8, 8), 10), (1, 8, 8))


def test_counts_queries_and_ledger_per_phase(onnx_bytes):
    o = ModelOracle(onnx_bytes, batch_size=7)
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    p = o.predict_proba(x)
    assert p.shape == (20, 10)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert o.queries == 20
    with o.phase("inversion"):
        o.predict_proba(x[:5])
        with o.phase("generator"):
            o.predict(x[:3])
        o.predict_proba(x[:2])
    assert o.queries == 30
    ledger = o.ledger.to_dict()
    assert ledger["default"]["queries"] == 20
    assert ledger["inversion"] == {"queries": 7, "calls": 2, "seconds": ledger["inversion"]["seconds"]}
    assert ledger["generator"]["queries"] == 3
    assert sum(v["queries"] for v in ledger.values()) == o.queries
    # batching is invisible: same answers in one call or many
    np.testing.assert_allclose(ModelOracle(onnx_bytes, batch_size=4096).predict_proba(x), p, atol=1e-6)


def test_budget_stops_before_the_offending_batch(onnx_bytes):
    o = ModelOracle(onnx_bytes, budget=25)
    x = np.zeros((10, 1, 8, 8), np.float32)
    o.predict_proba(x)
    o.predict_proba(x)
    assert o.remaining() == 5
    with o.phase("generator"), pytest.raises(QueryBudgetExceeded, match="generator"):
        o.predict_proba(x)
    assert o.queries == 20  # the refused batch was not counted
    o.predict_proba(x[:5])
    assert o.remaining() == 0


def test_rejects_bad_inputs(onnx_bytes):
    o = ModelOracle(onnx_bytes)
    with pytest.raises(InputShapeError, match="shape"):
        o.predict_proba(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(InputShapeError):
        o.predict_proba(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputShapeError, match="NaN"):
        bad = np.zeros((2, 1, 8, 8), np.float32)
        bad[0, 0, 0, 0] = np.nan
        o.predict_proba(bad)
    with pytest.raises(InputShapeError, match="floating"):
        o.predict_proba(np.zeros((2, 1, 8, 8), np.int64))
    assert o.queries == 0


def test_rejects_malformed_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf model")
    with pytest.raises(ModelLoadError, match="ONNX"):
        ModelOracle(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        ModelOracle(tmp_path / "missing.onnx")
