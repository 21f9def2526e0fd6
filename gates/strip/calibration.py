"""Calibrate STRIP for one model: validate held-out data, fit, set the threshold, write the artifact."""
from __future__ import annotations

from pathlib import Path

from ..data import Dataset
from ..oracle import ModelOracle
from ..validation import validate_heldout
from .detector import Strip


def calibrate_strip(oracle: ModelOracle, heldout: Dataset, frr: float = 0.01, n_perturbations: int = 10,
                    blend: str | None = None, seed: int = 0, min_per_class: int = 5, out_dir=None,
                    extra: dict | None = None):
    """Held-out expectations first (raises DataValidationError), then Strip fit + infer_threshold.

    Returns the fitted detector; with `out_dir` the boundary artifact is written there too.
    """
    validate_heldout(heldout.x, heldout.y, oracle.input_shape, oracle.n_classes, min_per_class=min_per_class)
    kwargs = {"n_perturbations": n_perturbations, "seed": seed}
    if blend:
        kwargs["blend"] = blend
    det = Strip(oracle, **kwargs).fit(heldout.x).infer_threshold(frr=frr)
    det.extra.update(extra or {})
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        det.save(out_dir)
    return det
