"""Release approval refuses anything the gate did not pass, and any STRIP artifact that does not verify."""

import numpy as np
import pytest
from mlflow import MlflowClient

from trojan_gate.gates.data import Dataset
from trojan_gate.pipelines.cli import main
from trojan_gate.plugins.gate import GateConfig, run_gate
from trojan_gate.plugins.promotion import PromotionRefused, promote
from trojan_gate.plugins.registry import intake_onnx, version_tags

pytestmark = pytest.mark.slow


def test_promote_refusals_and_approval(mlflow_store, tmp_path, digits, digits_benign, trojan_onnx, cached_scan):
    _, test = digits
    held = Dataset(test.x, test.y)
    pending = intake_onnx(trojan_onnx, "clf")
    with pytest.raises(PromotionRefused, match="never gated"):
        promote("clf", pending.version)
    assert run_gate(pending.uri, held, GateConfig(), scan_fn=cached_scan).verdict == "blocked"
    with pytest.raises(PromotionRefused, match="blocked"):
        promote("clf", pending.version)

    good = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    assert run_gate(good.uri, held, GateConfig(), scan_fn=cached_scan).verdict == "passed"
    assert main(["promote", "clf", good.version, "--alias", "production"]) == 0
    assert str(MlflowClient().get_registered_model("clf").aliases["production"]) == good.version
    assert main(["promote", "clf", pending.version, "--alias", "production"]) == 1
    assert str(MlflowClient().get_registered_model("clf").aliases["production"]) == good.version

    # tamper with the STRIP bank the guarded model serves: promotion must refuse
    guarded = MlflowClient().get_model_version("clf-guarded", version_tags(good)["trojan_gate.guarded_model"][-1])
    assert guarded.tags["trojan_gate.source_version"] == good.version
    banks = [p for p in (tmp_path / "mlruns").rglob("bank.npy") if "guarded_model" in str(p) or "models" in str(p)]
    assert banks, list((tmp_path / "mlruns").rglob("bank.npy"))
    for bank in banks:
        arr = np.load(bank)
        arr[0, 0, 0, 0] = 1.0 - arr[0, 0, 0, 0]
        np.save(bank, arr)
    with pytest.raises(PromotionRefused, match="STRIP artifact"):
        promote("clf", good.version, alias="production2")
    assert "production2" not in MlflowClient().get_registered_model("clf").aliases
