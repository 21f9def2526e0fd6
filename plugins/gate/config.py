"""The gate's configuration: scan, patch and run-time check settings, from code, a TOML file or CLI flags.

A settings file in ModelScan's habit (`trojan-gate gate ... --config trojan-gate.toml`):

    [gate]
    policy = "patch"          # block | patch
    alias = "candidate"
    seed = 0
    max_accuracy_drop = 0.01
    min_per_class = 5
    timeout_s = 14400          # the gate's deadline (default 4 h); call_timeout_s = 300 per model call

    [scan]
    decision = "calibrated"   # calibrated (a task calibration decides when one matches) | paper (double MAD)
    calibration = "auto"      # auto: the registered calibration of the task | a directory | models:/NAME/V | none
    paper_beside = true       # also run DeepInspect and report the paper's test beside the calibrated decision
    use_heldout = true        # the held-out data gives the scan its substitute set and references
    cutoff = 2.0
    budget = 2000000          # oracle queries per scan
    generator_steps = 300     # any other DeepInspect ScanConfig field

    [patch]
    soup = 4                  # any Patcher parameter

    [check]
    kind = "runtime"          # runtime (student disagreement + hidden features, gates.runtime) | strip (the paper)
    statistics = ["reference", "activation"]  # add "entropy" for STRIP's copies beside them
    stages = [1, 3]           # adaptive N with a copy statistic: copies asked before each early accept
    frr = 0.01
    n_perturbations = 10
    blend = "max"
    estimate_far = true

A misspelt section or key raises ConfigError naming it. The reuse fingerprint of a recorded
verdict hashes the *resolved* configuration (every default filled in, the scan's and the
patcher's included) with the package version, so a changed recipe never reuses an old verdict.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from trojan_gate.gates import __version__
from trojan_gate.gates.errors import TrojanGateError
from trojan_gate.gates.oracle import DEFAULT_CALL_TIMEOUT_S
from trojan_gate.gates.runtime import DEFAULT_KIND
from trojan_gate.gates.runtime.check import DEFAULT_STAGES, DEFAULT_STATISTICS

# A gate ends with verdict error after 4 hours by default (the worker kills its process after 6); the
# deadline is enforced per ONNX Runtime call by one long-lived watchdog thread (~12 us a call).
DEFAULT_TIMEOUT_S = 4 * 3600.0
GATE_POLICIES = ("block", "patch")  # what the gate does with a flagged model
GATE_KEYS = ("policy", "alias", "seed", "max_accuracy_drop", "min_per_class", "timeout_s", "call_timeout_s")


class ConfigError(TrojanGateError):
    """A gate setting is unknown or out of range; the message names it."""


DECISIONS = ("calibrated", "paper")
SCAN_KEYS = ("decision", "calibration", "paper_beside", "use_heldout", "cutoff", "budget")


@dataclass
class ScanSettings:
    """How the gate scans: which decision decides, the task calibration, held-out data use,
    threshold, query budget and DeepInspect options."""

    decision: str = "calibrated"
    calibration: str = "auto"
    paper_beside: bool = True
    use_heldout: bool = True
    cutoff: float = 2.0
    budget: int | None = None
    options: dict = field(default_factory=dict)  # ScanConfig fields

    def __post_init__(self):
        from trojan_gate.gates.deepinspect import ScanConfig

        _known("scan", self.options, ScanConfig.field_names())
        if not float(self.cutoff) > 0:
            raise ConfigError(f"scan.cutoff must be positive, not {self.cutoff!r}")
        if self.decision not in DECISIONS:
            raise ConfigError(f"scan.decision must be one of {DECISIONS}, not {self.decision!r}")
        if not isinstance(self.calibration, str) or not self.calibration:
            raise ConfigError(f"scan.calibration must be auto, none, a directory or models:/NAME/V, "
                              f"not {self.calibration!r}")

    def resolved(self) -> dict:
        from trojan_gate.gates.deepinspect import ScanConfig

        return {"decision": self.decision, "calibration": self.calibration, "paper_beside": bool(self.paper_beside),
                "use_heldout": bool(self.use_heldout), "cutoff": float(self.cutoff), "budget": self.budget,
                **ScanConfig(**self.options).to_dict()}


@dataclass
class CheckSettings:
    """The run-time check the gate attaches: its kind (the run-time check beyond STRIP, or STRIP as
    in the paper), its statistics and adaptive-N stages, preset FRR, N, superimposition rule, FAR
    estimate, and the serving policy signed into the release (no client chooses it per request)."""

    kind: str = DEFAULT_KIND
    statistics: list = field(default_factory=lambda: list(DEFAULT_STATISTICS))
    stages: list = field(default_factory=lambda: list(DEFAULT_STAGES))
    frr: float = 0.01
    n_perturbations: int = 10
    blend: str = "max"
    estimate_far: bool = True
    policy: str = "reject"  # what the served guarded model does with a flagged input: reject | flag

    def __post_init__(self):
        from trojan_gate.gates.runtime import KINDS
        from trojan_gate.gates.runtime.check import STATISTICS
        from trojan_gate.gates.copies import BLEND_RULES
        from trojan_gate.gates.guard import SERVING_POLICIES

        if self.kind not in KINDS:
            raise ConfigError(f"check.kind must be one of {KINDS}, not {self.kind!r}")
        self.statistics = list(self.statistics)
        bad = sorted(set(self.statistics) - set(STATISTICS))
        if bad or not self.statistics:
            raise ConfigError(f"check.statistics must be a non-empty list from {STATISTICS}, not {self.statistics!r}")
        try:
            self.stages = sorted(int(v) for v in self.stages)
        except (TypeError, ValueError):
            raise ConfigError(f"check.stages must be a list of copy counts, not {self.stages!r}") from None
        if any(v < 1 for v in self.stages):
            raise ConfigError(f"check.stages must be positive copy counts, not {self.stages!r}")
        if self.policy not in SERVING_POLICIES:
            raise ConfigError(f"check.policy must be one of {SERVING_POLICIES}, not {self.policy!r}")
        if not 0.0 < float(self.frr) < 1.0:
            raise ConfigError(f"check.frr must lie in (0, 1), not {self.frr!r}")
        if int(self.n_perturbations) < 1:
            raise ConfigError(f"check.n_perturbations must be >= 1, not {self.n_perturbations!r}")
        if self.blend not in BLEND_RULES:
            raise ConfigError(f"check.blend must be one of {tuple(BLEND_RULES)}, not {self.blend!r}")


@dataclass
class GateConfig:
    """Everything that decides a gate's outcome (hashed, resolved, into the reuse fingerprint)."""

    policy: str = "block"
    alias: str = "candidate"
    seed: int = 0
    max_accuracy_drop: float = 0.01
    min_per_class: int = 5
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S  # one ONNX Runtime call (a batch) of the model
    scan: ScanSettings = field(default_factory=ScanSettings)
    patch: dict = field(default_factory=dict)  # Patcher parameters
    check: CheckSettings = field(default_factory=CheckSettings)

    def __post_init__(self):
        if isinstance(self.scan, dict):
            self.scan = ScanSettings(**_section("scan", self.scan, ScanSettings))
        if isinstance(self.check, dict):
            self.check = CheckSettings(**_section("check", self.check, CheckSettings))
        if self.policy not in GATE_POLICIES:
            raise ConfigError(f"gate.policy must be one of {GATE_POLICIES}, not {self.policy!r}")
        if not isinstance(self.alias, str):
            raise ConfigError(f"gate.alias must be a name, not {self.alias!r}")
        if not self.alias or self.alias == "latest" or (self.alias.startswith("v") and self.alias[1:].isdigit()):
            raise ConfigError(f"gate.alias {self.alias!r} is reserved by MLflow")
        for key in ("timeout_s", "call_timeout_s"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"gate.{key} must be a positive number of seconds, not {value!r}")
        _known("patch", self.patch, set(patcher_names()) - {"seed", "progress"})

    @classmethod
    def from_dict(cls, doc: dict) -> "GateConfig":
        """From the settings file's layout: sections gate, scan, patch, check."""
        if "strip" in doc:
            raise ConfigError("section [strip] was renamed [check] (its key check was renamed kind); "
                              "rename it in the settings file")
        unknown = sorted(set(doc) - {"gate", "scan", "patch", "check"})
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; choose from gate, scan, patch, check")
        gate = dict(doc.get("gate") or {})
        _known("gate", gate, GATE_KEYS)
        scan = dict(doc.get("scan") or {})
        settings = {k: scan.pop(k) for k in SCAN_KEYS if k in scan}
        return cls(**gate, scan=ScanSettings(**settings, options=scan), patch=dict(doc.get("patch") or {}),
                   check=CheckSettings(**_section("check", doc.get("check") or {}, CheckSettings)))

    @classmethod
    def from_toml(cls, path) -> "GateConfig":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"settings file not found: {path}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
        return cls.from_dict(doc)

    def to_dict(self) -> dict:
        """The settings file's layout (only what was set)."""
        return {"gate": {k: getattr(self, k) for k in GATE_KEYS},
                "scan": {**{k: getattr(self.scan, k) for k in SCAN_KEYS}, **self.scan.options},
                "patch": dict(self.patch), "check": asdict(self.check)}

    def resolved(self) -> dict:
        """Every setting with its default filled in: what actually decides the outcome."""
        from trojan_gate.gates.patching import Patcher

        doc = self.to_dict()
        doc["scan"] = self.scan.resolved()
        doc["patch"] = Patcher(**{**self.patch, "seed": self.seed}).get_params()
        return doc

    def fingerprint(self, model_sha256: str, calibration_sha256: str | None = None,
                    heldout_sha256: str | None = None) -> str:
        """sha256 over the resolved configuration (timeout aside), the model, the scan calibration
        that will decide (None: the paper's test), the held-out data and the package version."""
        doc = self.resolved()
        doc["gate"].pop("timeout_s", None)
        doc["gate"].pop("call_timeout_s", None)
        doc.update(model_sha256=model_sha256, gate_version=__version__, calibration_sha256=calibration_sha256)
        if heldout_sha256 is not None:  # a verdict reached on other held-out data is not reused
            doc["heldout_sha256"] = heldout_sha256
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def patcher_names() -> list:
    from trojan_gate.gates.patching import Patcher

    return Patcher.param_names()


def _known(section: str, options: dict, known):
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(sorted(known))}")


def _section(name: str, doc: dict, cls) -> dict:
    _known(name, doc, {f.name for f in fields(cls)})
    return dict(doc)
