"""Intake registers third-party ONNX as a pending model version, or leaves the registry as it was."""
import json

import onnx
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper

from trojan_gate.gates.errors import ArtifactIntegrityError, ModelLoadError
from trojan_gate.gates.hashing import sha256_file
from trojan_gate.pipelines.cli import main
from trojan_gate.plugins.registry import fetch_onnx, intake_onnx, resolve, version_tags


def _registry_snapshot():
    client = MlflowClient()
    return sorted((m.name, v.version) for m in client.search_registered_models()
                  for v in client.search_model_versions(f"name='{m.name}'"))


def test_intake_registers_version_with_tags(mlflow_store, trojan_onnx):
    ref = intake_onnx(trojan_onnx, "digits-clf", source="vendor-x")
    tags = version_tags(ref)
    assert ref.version == "1"
    assert tags["trojan_gate.sha256"] == sha256_file(trojan_onnx)
    assert tags["trojan_gate.source"] == "vendor-x"
    assert tags["trojan_gate.input_shape"] == "1x8x8"
    assert tags["trojan_gate.n_classes"] == "10"
    assert tags["trojan_gate.status"] == "pending"
    assert sha256_file(fetch_onnx(ref)) == tags["trojan_gate.sha256"]
    assert intake_onnx(trojan_onnx, "digits-clf").version == "2"


def test_intake_of_malformed_file_leaves_registry_unchanged(mlflow_store, trojan_onnx, tmp_path):
    intake_onnx(trojan_onnx, "digits-clf")
    before = _registry_snapshot()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07definitely not a protobuf model" * 10)
    with pytest.raises(ModelLoadError, match="ONNX"):
        intake_onnx(bad, "digits-clf")
    with pytest.raises(ModelLoadError):
        intake_onnx(bad, "another-name")
    assert _registry_snapshot() == before


def _vector_model(path):
    """A valid ONNX graph that is not an image classifier: input (batch, 64)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_intake_rejects_non_image_model_with_named_problem(mlflow_store, tmp_path):
    with pytest.raises(ModelLoadError, match=r"\(batch, C, H, W\)"):
        intake_onnx(_vector_model(tmp_path / "vec.onnx"), "vec")
    assert _registry_snapshot() == []


def test_tampered_registry_artifact_is_refused(mlflow_store, trojan_onnx, tmp_path):
    ref = intake_onnx(trojan_onnx, "digits-clf")
    stored = next((tmp_path / "mlruns").rglob("model.onnx"))
    data = bytearray(stored.read_bytes())
    data[-10] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="tampered"):
        fetch_onnx(ref)


def test_cli_intake_exit_codes(mlflow_store, trojan_onnx, tmp_path, capsys):
    assert main(["intake", str(trojan_onnx), "--name", "cli-model"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_uri"] == "models:/cli-model/1" and out["tags"]["trojan_gate.status"] == "pending"
    assert resolve("models:/cli-model/1").version == "1"
    missing = tmp_path / "nope.onnx"
    assert main(["intake", str(missing), "--name", "cli-model"]) == 2
    assert "model file not found" in capsys.readouterr().err
