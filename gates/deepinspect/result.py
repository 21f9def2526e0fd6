"""The result of a DeepInspect scan: plain data, JSON-able, with sample triggers as arrays."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VERDICT_CLEAN = "clean"
VERDICT_TROJANED = "trojan_suspected"


@dataclass
class ScanResult:
    """Everything a DeepInspect scan measured, all of it from the oracle's answers.

    statistics[k]          perturbation level (L1) of class k's smallest recovered trigger that
                           reaches the success target on the oracle (the test statistic)
    deviation_factors[k]   left-tail double-MAD deviation factor of statistics[k] on `test_scale`
                           (log by default; 0 right of the median)
    success_rates[k]       oracle-measured share of stamped inverted images predicted as k (G's raw output)
    trigger_scales[k]      smallest rescaling of G(z, k) that reached the success target on the oracle
    reached[k]             whether that target was reached at all (False: statistic is an upper end)
    trigger_supports[k]    pixels kept in class k's winning trigger (the support ladder's choice)
    dense_statistics[k]    the same level without support pruning (full image)
    reference_statistics   (n_models, K) the same statistic measured on benign reference models
                           trained on held-out data (None without them); the test then runs on
                           log statistics[k] - mean_j log reference_statistics[j][k]
    median, mad            of the tested values (log levels when test_scale is "log")
    trigger_masks          (K, C, H, W) float32 0/1 winning supports (not serialised)
    flagged_classes        classes with deviation factor > cutoff (less those dropped as
                           transferable), plus their co-targets
    transfer_rates[k]      mean success on the reference models of class k's measured trigger
                           (None without references; see `transfer`)
    transferable_classes   classes past the cutoff whose trigger transfers to the references
                           more than `transfer_factor` x the median class's: reported, not flagged
    co_targets             flagged classes added by co-activation links, not by their own
                           deviation factor (multi-target trojans; see `cotargets`)
    co_activation          (K, K) A[t][u]: mean probability of u on images stamped with t's
                           trigger (None when nothing was flagged or links are off)
    reference_links        (K, K) mean link strength W on the reference models: each link's
                           natural level (None without references)
    trigger_samples        (K, m, C, H, W) float32 measured triggers s_k * M_k * G(z, k)
                           (x' = clip(x + delta, 0, 1))
    inverted_x/inverted_y  the substitute data set recovered by model inversion
    generator              the trained conditional generator, refined to the measured supports and
                           scales (not serialised; used by patching and the FAR estimate)
    """

    verdict: str
    flagged_classes: list
    statistics: list
    deviation_factors: list
    success_rates: list
    cutoff: float
    alpha: float
    n_classes: int
    input_shape: tuple
    model_sha256: str
    queries: int
    seconds: float
    phases: dict  # phase -> {"queries", "seconds"}
    seed: int
    config: dict
    versions: dict = field(default_factory=dict)
    trigger_scales: list = field(default_factory=list)
    reached: list = field(default_factory=list)
    median: float = 0.0
    mad: float = 0.0
    trigger_supports: list = field(default_factory=list)
    dense_statistics: list = field(default_factory=list)
    test_scale: str = "log"
    trigger_masks: np.ndarray | None = field(default=None, repr=False)
    trigger_samples: np.ndarray | None = field(default=None, repr=False)
    inverted_x: np.ndarray | None = field(default=None, repr=False)
    inverted_y: np.ndarray | None = field(default=None, repr=False)
    generator: object = field(default=None, repr=False)
    reference_statistics: list | None = None
    co_targets: list = field(default_factory=list)
    co_activation: list | None = None
    reference_links: list | None = None
    transfer_rates: list | None = None
    transferable_classes: list = field(default_factory=list)

    @property
    def trojan_suspected(self) -> bool:
        return self.verdict == VERDICT_TROJANED

    @property
    def max_deviation_factor(self) -> float:
        return float(max(self.deviation_factors)) if self.deviation_factors else 0.0

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "trojan_suspected": self.trojan_suspected,
            "flagged_classes": [int(c) for c in self.flagged_classes],
            "max_deviation_factor": round(self.max_deviation_factor, 6),
            "deviation_factors": [round(float(v), 6) for v in self.deviation_factors],
            "statistics": [round(float(v), 6) for v in self.statistics],
            "success_rates": [round(float(v), 6) for v in self.success_rates],
            "trigger_scales": [round(float(v), 6) for v in self.trigger_scales],
            "reached": [bool(v) for v in self.reached],
            "trigger_supports": [int(v) for v in self.trigger_supports],
            "dense_statistics": [round(float(v), 6) for v in self.dense_statistics],
            "test_scale": self.test_scale,
            "reference_statistics": None if self.reference_statistics is None else
            [[round(float(v), 6) for v in row] for row in self.reference_statistics],
            "co_targets": [int(c) for c in self.co_targets],
            "co_activation": None if self.co_activation is None else
            [[round(float(v), 6) for v in row] for row in self.co_activation],
            "reference_links": None if self.reference_links is None else
            [[round(float(v), 6) for v in row] for row in self.reference_links],
            "transfer_rates": None if self.transfer_rates is None else
            [round(float(v), 6) for v in self.transfer_rates],
            "transferable_classes": [int(c) for c in self.transferable_classes],
            "median": round(float(self.median), 6),
            "mad": round(float(self.mad), 6),
            "cutoff": float(self.cutoff),
            "alpha": float(self.alpha),
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

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path
