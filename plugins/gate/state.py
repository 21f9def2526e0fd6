"""What one gate run knows as it goes: the version, its model, data, scan, patch and STRIP results."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from trojan_gate.gates.errors import DeadlineExceeded, TrojanGateError

from ..registry import VersionRef
from .config import GateConfig
from .verdict import ERROR


class GateTimeout(DeadlineExceeded):
    """The gate ran past its time limit."""


class GateInterrupted(TrojanGateError):
    """The gate process was told to stop (SIGTERM); it fails closed with verdict error."""


@dataclass
class GateState:
    """The state a gate run carries from step to step (see `steps`)."""

    ref: VersionRef
    config: GateConfig
    client: object
    run_id: str
    fingerprint: str
    workdir: Path
    started: float = field(default_factory=time.monotonic)
    onnx_path: Path | None = None
    oracle: object = None  # ModelOracle of the version under test
    heldout: object = None  # validated Dataset
    calibration_choice: object = None  # CalibrationChoice: the scan calibration named before the run
    heldout_sha256: str | None = None  # the held-out data's digest in the reuse fingerprints
    calibration: object = None  # the loaded, verified ScanCalibration (None: the paper's test decides)
    decision: object = None  # ScanDecision of the version (what decided, both tests' results)
    scan: object = None  # DeepInspect ScanResult of the version (None when it did not run)
    patch: object = None  # PatchResult when a patch was tried
    fresh_decision: object = None  # ScanDecision of the patched model
    fresh: object = None  # DeepInspect ScanResult of the patched model
    new_ref: VersionRef | None = None  # the registered patched version
    check: object = None  # fitted run-time detector (RuntimeCheck or Strip) of the version that passed
    check_report: dict | None = None  # the run-time check's part of the report (scores, estimate)
    verdict: str = ERROR
    errors: list = field(default_factory=list)
    superseded: bool = False

    @property
    def final(self) -> VersionRef | None:
        """The version that holds the alias after a decided gate (None when blocked or failed)."""
        return {"passed": self.ref, "patched": self.new_ref}.get(self.verdict)

    @property
    def patched_fingerprint(self) -> str:
        """The reuse fingerprint of the patched version ("" when there is no patch)."""
        if self.patch is None:
            return ""
        choice = self.calibration_choice
        return self.config.fingerprint(self.patch.sha256, None if choice is None else choice.sha256, self.heldout_sha256)

    @property
    def deadline(self) -> float | None:
        """time.monotonic() value past which the gate stops (None: no limit)."""
        return None if self.config.timeout_s is None else self.started + float(self.config.timeout_s)

    def check_deadline(self, step: str):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise GateTimeout(f"gate exceeded its {self.config.timeout_s:.0f} s limit before {step}")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
