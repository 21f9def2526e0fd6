"""The result of a DeepInspect scan: plain data, JSON-able, with sample triggers as arrays."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _rounded(values, digits: int = 6):
    return None if values is None else [round(float(v), digits) for v in values]


def _rounded_matrix(rows, digits: int = 6):
    return None if rows is None else [[round(float(v), digits) for v in row] for row in rows]


@dataclass
class ScanResult:
    """Everything a DeepInspect scan measured, all of it from the oracle's answers.

    The model-level decision uses the project's one vocabulary: ``is_trojaned``,
    ``instance_score`` (the largest per-class deviation factor) and ``threshold`` (the
    deviation-factor cutoff c of Eq. 7).

    Attributes
    ----------
    is_trojaned : bool
        Some class is flagged (deviation factor > threshold, or a co-target of a flagged class).
    flagged_classes : list of int
        Suspected attack targets.
    statistics : list of float
        Per class, the perturbation level (L1) of the smallest recovered trigger that reaches
        the success target on the oracle (the test statistic).
    deviation_factors : list of float
        Left-tail double-MAD deviation factor of each class's log level (0 right of the median).
    threshold : float
        The cutoff c on the deviation factor; ``alpha`` is its two-sided normal significance.
    success_rates : list of float
        Oracle-measured share of stamped substitute images predicted as k (G's raw output).
    trigger_scales, trigger_supports, reached, dense_statistics : list
        The winning scale and support size of each class's trigger, whether the success target
        was reached at all, and the level without support pruning.
    reference_statistics : list of list or None
        (n_models, K) the same statistic on benign reference models trained on held-out data;
        the test then reads log statistics[k] - mean_j log reference_statistics[j][k].
    median, mad : float
        Of the tested log levels.
    co_targets : list of int
        Flagged classes added by co-activation links (multi-target trojans; see `cotargets`).
    co_activation, reference_links : (K, K) lists or None
        A[t][u] on the scanned model, and each link's natural level on the reference models.
    trigger_samples : ndarray (K, m, C, H, W)
        Measured triggers s_k * M_k * G(z, k); a stamped input is clip(x + delta, 0, 1).
    inverted_x, inverted_y : ndarray
        The substitute data set.
    generator : TriggerGenerator
        The trained conditional generator refined to the measured supports and scales (used by
        patching and the FAR estimate; not serialised).
    """

    is_trojaned: bool
    flagged_classes: list
    statistics: list
    deviation_factors: list
    success_rates: list
    threshold: float
    alpha: float
    n_classes: int
    input_shape: tuple
    model_sha256: str
    queries: int
    seconds: float
    phases: dict
    seed: int
    config: dict
    versions: dict = field(default_factory=dict)
    trigger_scales: list = field(default_factory=list)
    reached: list = field(default_factory=list)
    median: float = 0.0
    mad: float = 0.0
    trigger_supports: list = field(default_factory=list)
    dense_statistics: list = field(default_factory=list)
    reference_statistics: list | None = None
    co_targets: list = field(default_factory=list)
    co_activation: list | None = None
    reference_links: list | None = None
    trigger_masks: np.ndarray | None = field(default=None, repr=False)
    trigger_samples: np.ndarray | None = field(default=None, repr=False)
    inverted_x: np.ndarray | None = field(default=None, repr=False)
    inverted_y: np.ndarray | None = field(default=None, repr=False)
    generator: object = field(default=None, repr=False)

    @property
    def instance_score(self) -> float:
        """The largest per-class deviation factor: the model's score against `threshold`."""
        return float(max(self.deviation_factors)) if self.deviation_factors else 0.0

    def to_dict(self) -> dict:
        """The JSON-able fields, rounded (without trigger arrays, inverted data or the generator)."""
        return {
            "is_trojaned": bool(self.is_trojaned),
            "instance_score": round(self.instance_score, 6),
            "threshold": float(self.threshold),
            "alpha": float(self.alpha),
            "flagged_classes": [int(c) for c in self.flagged_classes],
            "co_targets": [int(c) for c in self.co_targets],
            "deviation_factors": _rounded(self.deviation_factors),
            "statistics": _rounded(self.statistics),
            "success_rates": _rounded(self.success_rates),
            "trigger_scales": _rounded(self.trigger_scales),
            "reached": [bool(v) for v in self.reached],
            "trigger_supports": [int(v) for v in self.trigger_supports],
            "dense_statistics": _rounded(self.dense_statistics),
            "reference_statistics": _rounded_matrix(self.reference_statistics),
            "co_activation": _rounded_matrix(self.co_activation),
            "reference_links": _rounded_matrix(self.reference_links),
            "median": round(float(self.median), 6),
            "mad": round(float(self.mad), 6),
            "n_classes": int(self.n_classes),
            "input_shape": [int(v) for v in self.input_shape],
            "model_sha256": self.model_sha256,
            "queries": int(self.queries),
            "seconds": round(float(self.seconds), 3),
            "phases": self.phases,
            "seed": int(self.seed),
            "config": self.config,
            "versions": self.versions,
        }

    def to_detector_output(self) -> dict:
        """Alibi Detect's output shape for the model as one instance."""
        return {"data": {"instance_score": self.instance_score, "is_trojaned": bool(self.is_trojaned),
                         "threshold": float(self.threshold)},
                "meta": {"name": "DeepInspect", "detector_type": "trojan", "data_type": "model",
                         "flagged_classes": [int(c) for c in self.flagged_classes],
                         "model_sha256": self.model_sha256, "queries": int(self.queries), "seed": int(self.seed)}}

    def to_json(self, path) -> Path:
        """Write `to_dict` as indented JSON to `path` (creating its folder); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path
