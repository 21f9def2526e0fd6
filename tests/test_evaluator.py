"""`mlflow.models.evaluate(..., evaluators="trojan")` + validate_evaluation_results blocks a trojaned model."""
import mlflow
import onnx
import pytest
from mlflow.models import MetricThreshold

from trojan_gate.plugins.registry import onnx_signature

pytestmark = pytest.mark.slow

THRESHOLDS = {"trojan_is_trojaned": MetricThreshold(threshold=0.5, greater_is_better=False)}


def _log(lab, name):
    with mlflow.start_run(run_name=f"log-{name}"):
        info = mlflow.onnx.log_model(onnx.load_model_from_string(lab.onnx_bytes), name=name,
                                     save_as_external_data=False, signature=onnx_signature(lab.in_shape, 10))
    return info.model_uri


def test_evaluator_blocks_trojaned_candidate_and_passes_benign(mlflow_store, digits, digits_trojan, digits_benign):
    _, test = digits
    x_flat, y = test.x.reshape(len(test.x), -1), test.y
    results = {}
    for name, lab in (("trojaned", digits_trojan), ("benign", digits_benign)):
        uri = _log(lab, name)
        with mlflow.start_run(run_name=f"eval-{name}"):
            results[name] = mlflow.models.evaluate(uri, data=x_flat, targets=y, model_type="classifier",
                                                   evaluators="trojan", evaluator_config={"seed": 0})
    trojaned = results["trojaned"].metrics
    assert trojaned["trojan_is_trojaned"] == 1.0 and trojaned["trojan_instance_score"] > trojaned["trojan_threshold"]
    assert trojaned["trojan_flagged_classes"] >= 1 and "check_threshold" in trojaned and "check_realised_frr" in trojaned
    assert "trojan_report" in results["trojaned"].artifacts  # the scan report, same format as `trojan-gate scan`
    with pytest.raises(mlflow.exceptions.MlflowException, match="trojan_is_trojaned"):
        mlflow.validate_evaluation_results(validation_thresholds=THRESHOLDS, candidate_result=results["trojaned"])
    assert results["benign"].metrics["trojan_is_trojaned"] == 0.0
    mlflow.validate_evaluation_results(validation_thresholds=THRESHOLDS, candidate_result=results["benign"])
