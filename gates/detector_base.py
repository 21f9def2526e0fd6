"""The contract every run-time detector keeps (Alibi Detect's `BaseDetector` habit).

    fit(x, y=None) -> self               learn from the defender's held-out images (and labels)
    infer_threshold(frr) -> self         threshold_ at a preset false rejection rate
    score(x) -> (n,) instance scores     higher means more trojan-like, for every detector
    predict(x) -> {"data": {...}, "meta": {...}}
    save(directory) / load(directory, model)
    describe() -> dict                   settings and threshold as tags and reports show them

`predict` fills one template: data.instance_score, data.is_trojaned (instance_score >=
threshold), data.threshold, data.proba (the served model's own answers on x, from the same
calls), data.model_calls (the inputs the served model was asked per input: the input and its
copies) and data.reference_calls (the reference classifier's, 0 for STRIP). A detector implements
`_answer(x) -> {"instance_score", "proba", "model_calls"[, "reference_calls"]}`.
Typed errors: NotFittedError before `fit`, ThresholdNotInferredError before `infer_threshold`.
"""
from __future__ import annotations

import numpy as np

from .errors import NotFittedError, ThresholdNotInferredError

SCORE_DIRECTION = "higher-is-trojan"


class RuntimeDetector:
    """Base of the run-time detectors: the shared `predict` template and checks (see the module doc)."""

    threshold_ = None
    bank_ = None

    def check_fitted(self) -> None:
        """Raise NotFittedError unless `fit` has run."""
        if getattr(self, "bank_", None) is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(heldout_x, heldout_y) first")

    def check_threshold(self) -> None:
        """Raise NotFittedError / ThresholdNotInferredError unless `fit` and `infer_threshold` have run."""
        self.check_fitted()
        if self.threshold_ is None:
            raise ThresholdNotInferredError(f"{type(self).__name__} has no threshold: call infer_threshold(frr) first")

    def _answer(self, x, **options) -> dict:
        raise NotImplementedError

    def predict(self, x, **options) -> dict:
        """{"data": {"instance_score", "is_trojaned", "threshold", "proba", "model_calls", "reference_calls"},
        "meta": meta()};
        `options` go to the detector's `_answer` (e.g. the run-time check's `adaptive`)."""
        self.check_threshold()
        out = self._answer(x, **options)
        score = np.asarray(out["instance_score"], dtype=np.float64)
        return {"data": {"instance_score": score, "is_trojaned": score >= self.threshold_,
                         "threshold": float(self.threshold_), "proba": out["proba"],
                         "model_calls": np.asarray(out["model_calls"], dtype=np.int64),
                         "reference_calls": np.asarray(out.get("reference_calls", np.zeros(len(score))),
                                                       dtype=np.int64)},
                "meta": self.meta()}

    def meta(self) -> dict:
        """What kind of detector this is and how it was set (never raises, fitted or not)."""
        return {"name": type(self).__name__, "detector_type": "trojan", "data_type": "image", "online": False,
                "score_direction": SCORE_DIRECTION, "frr": getattr(self, "frr_", None) if self.threshold_ is not None
                else None, "model_sha256": getattr(self, "model_sha256_", None)}
