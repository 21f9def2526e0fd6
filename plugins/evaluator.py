"""MLflow evaluator plugin `trojan`: DeepInspect and the run-time check's calibration inside `mlflow.models.evaluate`.

    result = mlflow.models.evaluate(model_uri, data=x_flat, targets=y, evaluators="trojan",
                                    evaluator_config={"seed": 0})
    mlflow.validate_evaluation_results(
        {"trojan_is_trojaned": MetricThreshold(threshold=0.5, greater_is_better=False)},
        candidate_result=result)            # raises ModelValidationFailedException for a trojaned model

MLflow hands numpy data over as 2-D arrays, so images arrive flattened (n, C*H*W); they are
reshaped to the model's (C, H, W). The model must be an ONNX (mlflow.onnx flavor) model: the
plugin reads the single ONNX file and queries it through the oracle only.

evaluator_config (flat when `evaluators="trojan"`): `seed` (0), `cutoff` (2.0), `budget`
(None), `use_heldout` (True: with labelled data the scan takes its substitute set and benign
reference models from it; False: model inversion alone), `calibrate_check` (True when labels
are given; `calibrate_strip`, its earlier name, is read too), `check` (the gate's default, `runtime`:
student disagreement + hidden features; or `strip`, the paper's test), `frr` (0.01), `n_perturbations`
(10), `blend`, `min_per_class` (5), `scan_options` (dict of DeepInspect options), `model_uri`
(override where the ONNX file is read from).
Labelled data is validated with great-expectations before any use.

Metrics: trojan_is_trojaned (0/1), trojan_instance_score (the largest deviation factor),
trojan_threshold, trojan_flagged_classes (count), trojan_scan_queries, trojan_scan_seconds,
and with labels check_threshold and check_frr (higher scores are more trojan-like; the run-time
check adds check_realised_frr, STRIP check_benign_mean and check_benign_std). Artifacts: the scan
report (JSON + HTML, the same format as `trojan-gate scan`) and the check's JSON document.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models.evaluation import EvaluationResult, ModelEvaluator
from mlflow.models.evaluation.artifacts import JsonEvaluationArtifact

from trojan_gate.gates.data import Dataset
from trojan_gate.gates.errors import InputShapeError, ModelLoadError
from trojan_gate.gates.oracle import ModelOracle

CONFIG_KEYS = {"seed", "cutoff", "budget", "use_heldout", "calibrate_check", "calibrate_strip", "check", "frr",
               "n_perturbations", "blend", "min_per_class", "scan_options", "model_uri"}


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


def _load_onnx(uri: str, dst: Path) -> Path:
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
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
        cfg = dict(evaluator_config or {})
        unknown = sorted(set(cfg) - CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown trojan evaluator_config key(s) {unknown}; choose from {sorted(CONFIG_KEYS)}")
        source = _onnx_source(model, kwargs.get("model_id"), cfg)
        with tempfile.TemporaryDirectory(prefix="trojan-eval-") as tmp:  # the download and the logged files
            return self._evaluate(source, dataset, run_id, cfg, Path(tmp))

    def _evaluate(self, source: str, dataset, run_id, cfg: dict, work: Path):
        from trojan_gate.gates.deepinspect import DeepInspect
        from trojan_gate.gates.validation import validate_heldout

        from .report import write_report

        onnx_path = _load_onnx(source, work / "model")
        oracle = ModelOracle(onnx_path)
        x = _images(dataset.features_data, oracle.input_shape)
        y = dataset.labels_data
        y = None if y is None else np.asarray(y).reshape(-1)
        heldout = None
        if y is not None:
            validate_heldout(x, y, oracle.input_shape, oracle.n_classes, min_per_class=int(cfg.get("min_per_class", 5)))
            heldout = Dataset(x, y.astype(np.int64))
        result = DeepInspect(cutoff=float(cfg.get("cutoff", 2.0)), seed=int(cfg.get("seed", 0)), budget=cfg.get("budget"),
                             progress=False, **cfg.get("scan_options", {})).scan(
            oracle, heldout=heldout if cfg.get("use_heldout", True) else None)
        metrics = {"trojan_is_trojaned": float(result.is_trojaned), "trojan_instance_score": result.instance_score,
                   "trojan_threshold": result.threshold, "trojan_flagged_classes": float(len(result.flagged_classes)),
                   "trojan_scan_queries": float(result.queries), "trojan_scan_seconds": float(result.seconds)}
        out = work / "out"
        json_path, html_path = write_report(out, kind="scan", model_name=Path(onnx_path).name, version=None,
                                            verdict="trojaned" if result.is_trojaned else "clean", scan=result)
        artifacts = {"trojan_report": JsonEvaluationArtifact(uri=self._log(run_id, json_path))}
        self._log(run_id, html_path)
        if heldout is not None and cfg.get("calibrate_check", cfg.get("calibrate_strip", True)):
            from trojan_gate.gates.runtime import CHECK_FILE, DEFAULT_KIND, calibrate_check
            from trojan_gate.gates.strip.artifact import BOUNDARY_FILE

            det = calibrate_check(oracle, heldout, kind=cfg.get("check", DEFAULT_KIND), frr=float(cfg.get("frr", 0.01)),
                                  n_perturbations=int(cfg.get("n_perturbations", 10)), blend=cfg.get("blend"),
                                  seed=int(cfg.get("seed", 0)), min_per_class=int(cfg.get("min_per_class", 5)))
            det.save(out / "check")
            view = det.describe()
            metrics.update({f"check_{k}": float(view[v]) for k, v in (
                ("threshold", "threshold"), ("frr", "frr"), ("realised_frr", "realised_frr"), ("benign_mean", "mean"),
                ("benign_std", "std")) if view.get(v) is not None})
            document = out / "check" / (CHECK_FILE if view["kind"] == "runtime" else BOUNDARY_FILE)
            artifacts["check"] = JsonEvaluationArtifact(uri=self._log(run_id, document))
        client = mlflow.MlflowClient()
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v))
        return EvaluationResult(metrics=metrics, artifacts=artifacts, run_id=run_id)

    @staticmethod
    def _log(run_id, path) -> str:
        client = mlflow.MlflowClient()
        client.log_artifact(run_id, str(path), artifact_path="trojan")
        return f"{client.get_run(run_id).info.artifact_uri}/trojan/{Path(path).name}"


__all__ = ["TrojanEvaluator"]
