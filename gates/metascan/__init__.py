"""The calibrated scan decision: shadow models of the task and a query-tuned meta-classifier.

    from trojan_gate.gates.metascan import ScanCalibration, save_calibration, load_calibration

    cal = ScanCalibration(n_shadows=400, cache_dir="shadows/").fit(heldout)   # once per task
    save_calibration(cal, "calibration/")
    verdict = load_calibration("calibration/").decide(ModelOracle("m.onnx"), heldout)
    verdict.is_trojaned, verdict.false_block_probability, verdict.flagged_classes

- `triggers`: the broad ("jumbo") trojan distribution shadows are drawn from;
- `shadows`: the cached shadow pool trained on the defender's held-out data;
- `meta`: MNTD's query-tuned meta-classifier with a per-class target head;
- `calibration`: the split-conformal decision at a stated false-block rate;
- `artifact`: save / load with integrity checks.
"""
from .artifact import calibration_sha256, load_calibration, save_calibration
from .calibration import CalibratedVerdict, ScanCalibration, conformal_p_value, conformal_threshold

__all__ = ["CalibratedVerdict", "ScanCalibration", "calibration_sha256", "conformal_p_value", "conformal_threshold",
           "load_calibration", "save_calibration"]
