"""Which test decides a scan, and the record of both: the calibrated decision and the paper's double MAD.

`decide(model, heldout, calibration, scanner)` is the one scan procedure the CLI and the gate use:

1. with a calibration (a fitted `ScanCalibration` of this task), the calibrated decision is
   taken first: m learned queries, no randomness, milliseconds;
2. DeepInspect (the paper's model inversion / generator / double-MAD test, `scanner`) runs when
   there is no calibration (it then decides), when the calibrated decision flags the model (its
   recovered triggers are what patching needs), or always with `paper_beside` (reported beside);
3. the verdict is the calibrated one when a calibration decided, else the paper's. A flagged
   model's target classes are the calibrated decision's, joined with the paper's when its test
   flags too.

`ScanDecision` records what decided, why, and both results, in the project's one vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CALIBRATED, PAPER = "calibrated", "paper"


@dataclass
class ScanDecision:
    """The outcome of a scan: the deciding test's verdict and both tests' results."""

    decided_by: str
    reason: str
    calibrated: object = None  # CalibratedVerdict
    paper: object = None  # deepinspect ScanResult
    calibration: dict = field(default_factory=dict)  # source, sha256 of the calibration used

    @property
    def is_trojaned(self) -> bool:
        """Whether the deciding test flags the model."""
        return bool((self.calibrated if self.decided_by == CALIBRATED else self.paper).is_trojaned)

    @property
    def flagged_classes(self) -> list:
        """Suspected targets: the deciding test's, joined with the paper's when it flags too ([] when not trojaned)."""
        if not self.is_trojaned:
            return []
        if self.decided_by == PAPER:
            return list(self.paper.flagged_classes)
        paper = list(self.paper.flagged_classes) if self.paper is not None and self.paper.is_trojaned else []
        return sorted(set(self.calibrated.flagged_classes) | set(paper))

    @property
    def instance_score(self) -> float:
        """The deciding test's model score."""
        return float((self.calibrated if self.decided_by == CALIBRATED else self.paper).instance_score)

    @property
    def threshold(self) -> float:
        """The deciding test's threshold on `instance_score`."""
        return float((self.calibrated if self.decided_by == CALIBRATED else self.paper).threshold)

    @property
    def queries(self) -> int:
        """Oracle queries of both tests together."""
        return sum(int(r.queries) for r in (self.calibrated, self.paper) if r is not None)

    @property
    def seconds(self) -> float:
        """Seconds of both tests together."""
        return sum(float(r.seconds) for r in (self.calibrated, self.paper) if r is not None)

    def to_dict(self) -> dict:
        """The decision and both tests' results as a JSON-able dict (scores rounded)."""
        return {"decided_by": self.decided_by, "reason": self.reason, "is_trojaned": self.is_trojaned,
                "flagged_classes": [int(c) for c in self.flagged_classes],
                "instance_score": round(self.instance_score, 6), "threshold": round(self.threshold, 6),
                "calibration": dict(self.calibration) or None,
                "calibrated": None if self.calibrated is None else self.calibrated.to_dict(),
                "paper": None if self.paper is None else {
                    "is_trojaned": bool(self.paper.is_trojaned),
                    "flagged_classes": [int(c) for c in self.paper.flagged_classes],
                    "instance_score": round(float(self.paper.instance_score), 6),
                    "threshold": float(self.paper.threshold), "seed": int(self.paper.seed)},
                "queries": self.queries, "seconds": round(self.seconds, 3)}

    def tags(self) -> dict:
        """Registry tags (under `trojan_gate.`): the deciding verdict, then each test's own."""
        out = {"scan.decision": self.decided_by, "scan.decision_reason": self.reason[:4000],
               "scan.is_trojaned": str(self.is_trojaned).lower(), "scan.instance_score": f"{self.instance_score:.4f}",
               "scan.threshold": f"{self.threshold:g}", "scan.flagged_classes": ",".join(map(str, self.flagged_classes)),
               "scan.queries": str(self.queries), "scan.seconds": f"{self.seconds:.1f}",
               "scan.calibration": self.calibration.get("source", ""),
               "scan.calibration_sha256": self.calibration.get("sha256", "")}
        if self.calibrated is not None:
            out["scan.false_block_probability"] = f"{self.calibrated.false_block_probability:.4f}"
        if self.paper is not None:
            out.update({"scan.paper.is_trojaned": str(bool(self.paper.is_trojaned)).lower(),
                        "scan.paper.flagged_classes": ",".join(map(str, self.paper.flagged_classes)),
                        "scan.paper.instance_score": f"{self.paper.instance_score:.4f}"})
        else:
            out.update({"scan.paper.is_trojaned": "not run", "scan.paper.flagged_classes": "",
                        "scan.paper.instance_score": ""})
        return out


def decide(oracle, heldout, calibration, scanner, paper_beside: bool = True, reason: str = "",
           source: str = "") -> ScanDecision:
    """Scan `oracle` (see the module's steps). `calibration` is a fitted ScanCalibration or None
    (`reason` then says why there is none); `scanner(oracle, heldout)` runs DeepInspect."""
    if calibration is None:
        return ScanDecision(PAPER, reason or "no scan calibration", paper=scanner(oracle, heldout))
    calibrated = calibration.decide(oracle, heldout)
    paper = scanner(oracle, heldout) if paper_beside or calibrated.is_trojaned else None
    info = {"source": source or getattr(calibration, "registry_uri_", "") or "", "sha256": calibration.sha256_}
    why = reason or f"the task calibration {calibration.sha256_[:16]} matches the model and the held-out data"
    return ScanDecision(CALIBRATED, why, calibrated=calibrated, paper=paper, calibration=info)
