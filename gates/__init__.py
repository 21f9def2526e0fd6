"""trojan-gate's science, free of MLflow: the public Python API.

    from trojan_gate.gates import ModelOracle, DeepInspect, RuntimeCheck, Strip, Patcher, GuardedClassifier

    oracle = ModelOracle("m.onnx")                                   # the only door to a model
    result = DeepInspect(cutoff=2.0, seed=0).scan(oracle, heldout=(x, y))
    strip = Strip(oracle, n_perturbations=10).fit(x).infer_threshold(frr=0.01)
    strip.predict(x_new)  # {"data": {"instance_score", "is_trojaned", "threshold"}, "meta": {...}}
    check = RuntimeCheck(oracle).fit(x, y).infer_threshold(frr=0.01)  # student + hidden features, one call per input

- `ModelOracle`: batched, counted class-probability queries to an ONNX model (ONNX Runtime);
- `DeepInspect`: the black-box trojan scan (Chen et al., IJCAI'19) returning a `ScanResult`;
- `ScanCalibration`: the calibrated scan decision of a task (shadow models trained on the held-out
  data, query-tuned stamp probes, a split-conformal threshold at a stated false-block rate);
  `save_calibration` / `load_calibration` write and verify it;
- `Patcher`: fine-tuning a flagged model with generated triggers and correct labels (`PatchResult`);
- `Strip`: the run-time input detector (Gao et al., ACSAC'19), Alibi Detect's fit / infer_threshold / predict;
- `RuntimeCheck`: the run-time check beyond STRIP (entropy and disagreement with a clean reference
  classifier, one calibrated min-p test, adaptive N), same contract;
- `GuardedClassifier`: a model plus its fitted check, labels and flags per batch;
- `load_heldout` / `validate_heldout`: a user's labelled held-out set, checked with great-expectations.

Every detector speaks one vocabulary: `instance_score`, `threshold`, `is_trojaned`.
"""
from importlib import metadata as _metadata

from .lazy import lazy_getattr

try:
    __version__ = _metadata.version("trojan-gate")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

# Public names resolve lazily (PEP 562): importing one submodule, e.g. the guarded model's STRIP
# code at serving time, does not pull torch in through the patcher.
_EXPORTS = {
    "Dataset": ".data", "load_heldout": ".data", "validate_heldout": ".validation",
    "DeepInspect": ".deepinspect", "ScanConfig": ".deepinspect", "ScanResult": ".deepinspect",
    "ModelOracle": ".oracle", "Patcher": ".patching", "PatchResult": ".patching",
    "ScanCalibration": ".metascan", "load_calibration": ".metascan", "save_calibration": ".metascan",
    "GuardedClassifier": ".guard", "RuntimeDetector": ".detector_base", "Strip": ".strip", "RuntimeCheck": ".runtime",
    **{name: ".errors" for name in ("ArtifactIntegrityError", "DataValidationError", "InputShapeError",
                                    "ModelLoadError", "ModelOutputError", "NotFittedError", "QueryBudgetExceeded",
                                    "ThresholdNotInferredError", "TrojanGateError")},
}
__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__
