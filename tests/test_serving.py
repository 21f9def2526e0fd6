"""A guarded model registered by `calibrate` and served by `mlflow models serve` flags trigger-stamped inputs."""
import numpy as np
import pytest

from trojan_gate.pipelines.cli import main
from trojan_gate.plugins.registry import intake_onnx, resolve, version_tags
from trojan_gate.plugins.serving import invoke, served_model

pytestmark = pytest.mark.slow


def _calibrated(trojan_onnx, heldout_npz, name):
    """Register the trojaned digits model as `name` and calibrate it; returns (version, its tags)."""
    ref = intake_onnx(trojan_onnx, name)
    assert main(["calibrate", ref.uri, "--heldout", str(heldout_npz), "--frr", "0.05", "--n", "10"]) == 0
    return ref, version_tags(ref)


@pytest.mark.serve
def test_guarded_model_served_over_rest_answers_with_flags(mlflow_store, trojan_onnx, heldout_npz, digits,
                                                           digits_trojan):
    ref, tags = _calibrated(trojan_onnx, heldout_npz, "digits-clf")
    for key in ("strip.threshold", "strip.n", "strip.frr", "strip.artifact_sha256", "guarded_model"):
        assert f"trojan_gate.{key}" in tags
    assert tags["trojan_gate.strip.n"] == "10"
    guarded = resolve(tags["trojan_gate.guarded_model"])
    assert version_tags(guarded)["trojan_gate.source_version"] == ref.version

    _, test = digits
    victims = np.flatnonzero(test.y != 3)[:20]
    clean = test.x[victims]
    stamped = digits_trojan.stamp(clean)
    with served_model(guarded.uri, tracking_uri=mlflow_store) as url:
        clean_pred = invoke(url, clean)
        stamped_pred = invoke(url, stamped)
        rejected = invoke(url, stamped, params={"policy": "reject"})
    assert set(clean_pred[0]) == {"label", "probability", "instance_score", "is_trojaned"}
    clean_flags = np.array([p["is_trojaned"] for p in clean_pred])
    stamped_flags = np.array([p["is_trojaned"] for p in stamped_pred])
    assert stamped_flags.mean() >= 0.8
    assert clean_flags.mean() <= 0.2
    assert np.mean([p["label"] == 3 for p in stamped_pred]) >= 0.8  # the trojan hijacks; the guard flags
    assert any(p["is_trojaned"] for p in rejected)
    assert all((p["label"] == -1) == p["is_trojaned"] for p in rejected)
    assert max(p["instance_score"] for p in stamped_pred if p["is_trojaned"]) <= float(tags["trojan_gate.strip.threshold"])


def test_guarded_model_loaded_in_process_takes_image_tensors(mlflow_store, trojan_onnx, heldout_npz, digits,
                                                               digits_trojan):
    import mlflow
    import pandas as pd

    _, tags = _calibrated(trojan_onnx, heldout_npz, "digits-clf-local")
    guarded = resolve(tags["trojan_gate.guarded_model"])
    model = mlflow.pyfunc.load_model(guarded.uri)
    _, test = digits
    victims = np.flatnonzero(test.y != 3)[:20]
    clean, stamped = test.x[victims], digits_trojan.stamp(test.x[victims])
    out = model.predict(np.concatenate([clean, stamped]).astype(np.float32))
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["label", "probability", "instance_score",
                                                                   "is_trojaned"]
    assert out["is_trojaned"][:20].mean() <= 0.2 and out["is_trojaned"][20:].mean() >= 0.8
    rejected = model.predict(stamped.astype(np.float32), params={"policy": "reject"})
    assert ((rejected["label"] == -1) == rejected["is_trojaned"]).all()
