"""MLflow evaluator plugin `trojan`: DeepInspect (and STRIP calibration) inside `mlflow.models.evaluate`.

    result = mlflow.models.evaluate(model_uri, data=x_flat, targets=y, evaluators="trojan",
                                    evaluator_config={"seed": 0})
    mlflow.validate_evaluation_results(
        {"trojan_max_deviation_factor": MetricThreshold(threshold=2.0, greater_is_better=False)},
        candidate_result=result)            # raises ModelValidationFailedException for a trojaned model

MLflow hands numpy data over as 2-D arrays, so images arrive flattened (n, C*H*W); they are
reshaped to the model's (C, H, W). The model must be an ONNX (mlflow.onnx flavor) model: the
plugin reads the single ONNX file and queries it through the oracle only.

evaluator_config (flat when `evaluators="trojan"`): `seed` (0), `cutoff` (2.0), `budget`
(None), `use_heldout_for_scan` (True: with labelled data the scan takes its
substitute set and benign reference models from it, see `gates.reference`; False: model
inversion alone), `calibrate_strip` (True when labels are given), `frr`
(0.01), `n_perturbations` (10), `blend`, `min_per_class` (5), `scan_options` (dict), `model_uri`
(override where the ONNX file is read from).

Metrics: trojan_max_deviation_factor, trojan_flagged_classes (count), trojan_suspected (0/1),
trojan_scan_queries, trojan_scan_seconds, and with labels strip_boundary, strip_benign_mean,
strip_benign_std. Artifacts: the scan JSON, the trigger grid PNG and the STRIP boundary JSON.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models.evaluation import EvaluationResult, ModelEvaluator
from mlflow.models.evaluation.artifacts import ImageEvaluationArtifact, JsonEvaluationArtifact

from trojan_gate.gates.data import Dataset
from trojan_gate.gates.errors import InputShapeError, ModelLoadError
from trojan_gate.gates.oracle import ModelOracle


def _onnx_source(model, model_id, cfg) -> str:
    if cfg.get("model_uri"):
        return cfg["model_uri"]
    if model_id:
        return f"models:/{model_id}"
    meta = getattr(model, "metadata", None)
    if meta is not None and getattr(meta, "model_id", None):
        return f"models:/{meta.model_id}"
    if meta is not None and meta.run_id and meta.artifact_path:
        return f"runs:/{meta.run_id}/{meta.artifact_path}"
    raise ModelLoadError("the trojan evaluator cannot locate the model's ONNX file; pass evaluator_config={'model_uri': ...}")


def _load_onnx(uri: str) -> Path:
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="trojan-eval-")))
    files = [local] if local.is_file() else sorted(local.rglob("*.onnx"))
    if not files:
        raise ModelLoadError(f"{uri} holds no .onnx file: the trojan evaluator scans ONNX models only")
    return files[0]


def _images(features, shape) -> np.ndarray:
    x = features.to_numpy() if hasattr(features, "to_numpy") else np.asarray(features)
    x = np.asarray(x, dtype=np.float32)
    size = int(np.prod(shape))
    if x.ndim == 2 and x.shape[1] == size:
        return x.reshape((-1,) + tuple(shape))
    if x.ndim == 4 and tuple(x.shape[1:]) == tuple(shape):
        return x
    raise InputShapeError(f"evaluation data must be flattened images (n, {size}) for a model input {tuple(shape)}; "
                          f"got {x.shape}")


class TrojanEvaluator(ModelEvaluator):
    """`evaluators="trojan"`: black-box DeepInspect scan + STRIP calibration as MLflow metrics."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type in (None, "classifier")

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, extra_metrics=None,
                 custom_artifacts=None, predictions=None, **kwargs):
        from trojan_gate.gates.scan import scan

        cfg = dict(evaluator_config or {})
        onnx_path = _load_onnx(_onnx_source(model, kwargs.get("model_id"), cfg))
        oracle = ModelOracle(onnx_path, budget=cfg.get("budget"))
        x = _images(dataset.features_data, oracle.input_shape)
        y = dataset.labels_data
        y = None if y is None else np.asarray(y).reshape(-1).astype(np.int64)
        heldout = Dataset(x, y) if y is not None else None
        result = scan(oracle, heldout=heldout if cfg.get("use_heldout_for_scan", True) else None,
                      seed=int(cfg.get("seed", 0)), cutoff=float(cfg.get("cutoff", 2.0)),
                      **cfg.get("scan_options", {}))
        metrics = {"trojan_max_deviation_factor": result.max_deviation_factor,
                   "trojan_flagged_classes": float(len(result.flagged_classes)),
                   "trojan_suspected": float(result.trojan_suspected),
                   "trojan_scan_queries": float(result.queries), "trojan_scan_seconds": float(result.seconds)}
        out = Path(tempfile.mkdtemp(prefix="trojan-eval-out-"))
        artifacts = {}
        scan_json = result.to_json(out / "trojan_scan.json")
        artifacts["trojan_scan"] = JsonEvaluationArtifact(uri=self._log(run_id, scan_json))
        png = self._trigger_png(result, out / "trojan_triggers.png")
        if png is not None:
            artifacts["trojan_triggers"] = ImageEvaluationArtifact(uri=self._log(run_id, png))
        if heldout is not None and cfg.get("calibrate_strip", True):
            from trojan_gate.gates.calibration import calibrate_strip

            det = calibrate_strip(oracle, heldout, frr=float(cfg.get("frr", 0.01)),
                                  n_perturbations=int(cfg.get("n_perturbations", 10)), blend=cfg.get("blend"),
                                  seed=int(cfg.get("seed", 0)), min_per_class=int(cfg.get("min_per_class", 5)),
                                  out_dir=out / "strip_boundary")
            metrics.update(strip_boundary=float(det.threshold_), strip_benign_mean=float(det.mean_),
                           strip_benign_std=float(det.std_))
            artifacts["strip_boundary"] = JsonEvaluationArtifact(
                uri=self._log(run_id, out / "strip_boundary" / "boundary.json"))
        client = mlflow.MlflowClient()
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v))
        return EvaluationResult(metrics=metrics, artifacts=artifacts, run_id=run_id)

    @staticmethod
    def _log(run_id, path) -> str:
        client = mlflow.MlflowClient()
        client.log_artifact(run_id, str(path), artifact_path="trojan")
        return f"{client.get_run(run_id).info.artifact_uri}/trojan/{Path(path).name}"

    @staticmethod
    def _trigger_png(result, path):
        if result.trigger_samples is None:
            return None
        try:
            from trojan_gate.gates.report import trigger_grid_figure
        except ImportError:
            return None
        import base64

        b64 = trigger_grid_figure(result.trigger_samples, result.flagged_classes, result.statistics)
        path.write_bytes(base64.b64decode(b64))
        return path


__all__ = ["TrojanEvaluator"]
