"""Transfer of the measured triggers to the benign reference models (a backdoor is model-specific)."""
import numpy as np
import pytest

from trojan_gate.gates.scan import scan
from trojan_gate.gates.transfer import specific_classes, transfer_rates


class _PixelGenerator:
    """G(z, t) = a one-hot image lighting pixel t; records the seeds it was drawn with."""
    n_classes = 3

    def __init__(self):
        self.seeds = []

    def raw_sample(self, t, n, seed=0):
        self.seeds.append(seed)
        d = np.zeros((n, 1, 2, 2), np.float32)
        d[:, 0, t // 2, t % 2] = 1.0
        return d


class _BrightestPixel:
    """A reference model: the class of the brightest of pixels 0..2 when it exceeds 0.5, else class 0."""

    def predict_proba(self, x):
        flat = x.reshape(len(x), -1)[:, :3]
        c = np.where(flat.max(1) > 0.5, flat.argmax(1), 0)
        return np.eye(3)[c]


class _AlwaysZero:
    def predict_proba(self, x):
        return np.eye(3)[np.zeros(len(x), int)]


def _substitute():
    return np.zeros((6, 1, 2, 2), np.float32), np.array([0, 0, 1, 1, 2, 2])


def test_transfer_rate_is_the_references_success_on_the_measured_trigger():
    x, y = _substitute()
    g = _PixelGenerator()
    masks, scales = np.ones((3, 1, 2, 2), np.float32), [1.0, 0.2, 1.0]  # class 1's trigger is too faint
    tau = transfer_rates([_BrightestPixel()], g, masks, scales, x, y, seed=7, progress=False)
    assert tau.tolist() == [1.0, 0.0, 1.0]
    assert g.seeds == [7000, 7001, 7002]  # the statistic's own draws: seed * 1000 + t
    both = transfer_rates([_BrightestPixel(), _AlwaysZero()], _PixelGenerator(), masks, scales, x, y, progress=False)
    assert both.tolist() == [1.0, 0.0, 0.5]  # mean over reference models
    cut = np.ones((3, 1, 2, 2), np.float32)
    cut[2] = 0.0  # a support that leaves class 2's pixel out moves nothing
    assert transfer_rates([_BrightestPixel()], _PixelGenerator(), cut, [1, 1, 1], x, y, progress=False)[2] == 0.0


def test_transfer_rates_refuse_no_references_or_wrong_sizes():
    x, y = _substitute()
    with pytest.raises(ValueError, match="at least one reference"):
        transfer_rates([], _PixelGenerator(), np.ones((3, 1, 2, 2)), [1, 1, 1], x, y, progress=False)
    with pytest.raises(ValueError, match="masks and scales"):
        transfer_rates([_AlwaysZero()], _PixelGenerator(), np.ones((2, 1, 2, 2)), [1, 1], x, y, progress=False)


def test_a_flagged_class_is_kept_only_when_its_trigger_transfers_little():
    rates = [0.1, 0.6, 0.5, 0.7, 0.4]  # median 0.5
    assert specific_classes([0, 4], rates, 0.5) == ([0], [4])  # 0.1 <= 0.25 kept; 0.4 > 0.25 dropped
    assert specific_classes([0, 4], rates, 0.8) == ([0, 4], [])  # bound 0.4: 0.4 kept (<=)
    assert specific_classes([0, 4], rates, 0.0) == ([0, 4], [])  # 0: report only
    assert specific_classes([], rates, 0.5) == ([], [])


@pytest.fixture(scope="module")
def filtered(digits, digits_trojan):
    _, test = digits
    return {f: scan(digits_trojan.onnx_bytes, heldout=test, seed=0, progress=False, transfer_factor=f)
            for f in (0.5, 0.05)}


def test_the_trojan_trigger_does_not_transfer_and_survives_the_filter(filtered):
    r = filtered[0.5]
    tau = np.asarray(r.transfer_rates)
    assert tau.shape == (10,) and ((0 <= tau) & (tau <= 1)).all()
    assert tau[3] < 0.5 * np.median(tau)  # the backdoor is specific to the scanned model
    assert r.flagged_classes == [3] and r.transferable_classes == []
    assert r.to_dict()["transfer_rates"] == pytest.approx(r.transfer_rates, abs=1e-6)


def test_a_factor_below_the_targets_own_ratio_drops_it_and_the_verdict_follows(filtered):
    r, kept = filtered[0.05], filtered[0.5]
    tau = np.asarray(r.transfer_rates)
    assert tau[3] > 0.05 * np.median(tau)  # the premise: class 3's trigger moves a few reference images
    assert r.transferable_classes == [3] and r.flagged_classes == [] and r.verdict == "clean"
    assert r.deviation_factors == kept.deviation_factors  # the test itself is unchanged; only the flag
    assert r.to_dict()["transferable_classes"] == [3]


def test_a_negative_factor_is_refused_before_any_query(digits_trojan):
    from trojan_gate.gates.oracle import ModelOracle

    oracle = ModelOracle(digits_trojan.onnx_bytes)
    with pytest.raises(ValueError, match="transfer_factor must be >= 0"):
        scan(oracle, transfer_factor=-1.0, progress=False)
    assert oracle.queries == 0


def test_scan_cli_reports_a_transferable_class_and_exits_clean(tmp_path, capsys, digits_trojan, heldout_npz):
    import json

    from trojan_gate.pipelines.cli import main

    model = digits_trojan.save(tmp_path / "trojan.onnx")
    report = tmp_path / "r.json"
    assert main(["scan", str(model), "--heldout", str(heldout_npz), "--transfer-factor", "0.05",
                 "--report", str(report), "--no-progress"]) == 0
    d = json.loads(report.read_text())
    assert d["verdict"] == "clean" and d["transferable_classes"] == [3] and len(d["transfer_rates"]) == 10
    assert "transferable to the references: [3]" in capsys.readouterr().out
