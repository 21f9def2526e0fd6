"""Release approval refuses anything the gate did not pass, and any guarded release that does not verify."""

import tempfile

import pytest
from mlflow import MlflowClient

from trojan_gate.gates.data import Dataset
from trojan_gate.pipelines.cli import main
from trojan_gate.plugins.gate import GateConfig, run_gate
from trojan_gate.plugins.promotion import PromotionRefused, promote
from trojan_gate.plugins.registry import intake_onnx

from helpers import leftover_scratch

pytestmark = pytest.mark.slow


def test_promote_refusals_and_approval(mlflow_store, tmp_path, digits, digits_benign, trojan_onnx, cached_scan,
                                       monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where intake, gate and promotion download to
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
    client = MlflowClient()
    client.set_registered_model_alias("clf", "production", good.version)  # set by hand before this release
    assert main(["promote", "clf", good.version, "--alias", "production"]) == 0
    guarded = client.get_model_version("clf", good.version).tags["trojan_gate.guarded_model"]
    served = client.get_model_version_by_alias("clf-guarded", "production")
    assert f"models:/clf-guarded/{served.version}" == guarded  # what a serving team deploys checks every input
    assert "production" not in client.get_registered_model("clf").aliases  # the raw ONNX never holds it
    assert client.get_model_version("clf", good.version).tags["trojan_gate.promoted.production"] == guarded
    assert main(["promote", "clf", pending.version, "--alias", "production"]) == 1
    assert client.get_model_version_by_alias("clf-guarded", "production").version == served.version
    assert leftover_scratch(scratch) == []  # downloads and staging are removed: a gate host's disk does not fill

    # an attacker with write access to the artifact store moves the threshold and re-hashes the
    # artifact so that its own integrity checks pass: the signature still refuses it
    from trojan_gate.pipelines.benchmarks.hostile import move_threshold

    docs = [p.parent for p in (tmp_path / "mlruns").rglob("verdict.json") if "release" in p.parts]
    assert docs
    for path in docs:
        move_threshold(path / "boundary", 1e9)
    with pytest.raises(PromotionRefused, match="signature does not verify"):
        promote("clf", good.version, alias="production2")
    assert "production2" not in MlflowClient().get_registered_model("clf-guarded").aliases
    assert main(["promote", "clf", good.version, "--alias", "production2"]) == 1
