"""What a patch produced and what it changed (`PatchResult`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .measure import paired_drop_standard_error

_RATIO_EPS = 1e-9  # tolerance for comparing ratios of counts with a bound


@dataclass
class PatchResult:
    """What a patch produced and what it changed, measured with ONNX Runtime.

    before/after: {"clean_accuracy" (held-out evaluation split, None without held-out data),
    "trojan_activation_rate" (pooled over flagged classes), "trojan_activation_rates"
    ({class: rate}), "queries"}. `history` holds the validation figures of every epoch
    (epoch 0 = the unpatched model) of every fine-tuning run of the soup.
    """

    onnx_bytes: bytes = field(repr=False)
    sha256: str
    source_sha256: str
    flagged_classes: list
    before: dict
    after: dict
    output_kind: str
    epochs_run: int
    history: list
    n_train: int
    n_patch: int
    n_val: int
    n_eval: int
    eval_source: str  # "heldout" or "validation"
    config: dict
    seconds: float
    # per-image correctness on the clean evaluation images, before and after (None without them)
    correct_before: np.ndarray | None = field(default=None, repr=False)
    correct_after: np.ndarray | None = field(default=None, repr=False)
    # the fresh universal-trigger search on the patched model (`acceptance.ResidualRisk`)
    residual: object = None

    @property
    def residual_accepted(self) -> bool:
        """Whether the residual-risk evidence accepts the patch (False when it was not taken)."""
        return bool(self.residual is not None and self.residual.accepted)

    @property
    def accuracy_drop(self) -> float | None:
        """Clean accuracy before minus after (None without held-out evaluation data)."""
        a, b = self.before.get("clean_accuracy"), self.after.get("clean_accuracy")
        return None if a is None or b is None else float(a - b)

    @property
    def accuracy_drop_se(self) -> float | None:
        """Paired standard error of `accuracy_drop` (`paired_drop_standard_error`): how much of
        the measured drop the evaluation images' draw alone could move. Reported, not used in
        the bound, which stays on the measured drop (the gate fails closed)."""
        return paired_drop_standard_error(self.correct_before, self.correct_after)

    def within_accuracy_drop(self, max_accuracy_drop: float) -> bool:
        """No measured drop, or one within `max_accuracy_drop`. The one comparison the gate and
        `meets` share: accuracies are ratios of counts, so 0.901 - 0.891 (which
        floating point makes 0.010000000000000009) must count as one point."""
        drop = self.accuracy_drop
        return bool(drop is None or drop <= max_accuracy_drop + _RATIO_EPS)

    def meets(self, max_activation_rate: float = 0.10, max_accuracy_drop: float = 0.01) -> bool:
        """The issue's target: activation rate <= 10% and clean accuracy drop <= 1 point."""
        if not np.isfinite(self.after["trojan_activation_rate"]):
            return False
        ok = self.after["trojan_activation_rate"] <= max_activation_rate + _RATIO_EPS
        return bool(ok and self.within_accuracy_drop(max_accuracy_drop))

    def to_dict(self) -> dict:
        """The figures as a JSON-able dict (class keys as strings; no model bytes or per-image arrays)."""

        def clean(d):
            return {k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}

        return {"sha256": self.sha256, "source_sha256": self.source_sha256,
                "flagged_classes": [int(c) for c in self.flagged_classes],
                "before": clean(self.before), "after": clean(self.after),
                "accuracy_drop": self.accuracy_drop, "accuracy_drop_se": self.accuracy_drop_se,
                "output_kind": self.output_kind,
                "epochs_run": int(self.epochs_run), "history": self.history,
                "n_train": self.n_train, "n_patch": self.n_patch, "n_val": self.n_val, "n_eval": self.n_eval,
                "eval_source": self.eval_source, "config": self.config, "seconds": round(self.seconds, 3),
                "residual": None if self.residual is None else self.residual.to_dict()}

    def save(self, path) -> Path:
        """Write the patched model to `path` and its figures next to it as `<path>.json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(self.to_dict(), indent=2))
        return path
