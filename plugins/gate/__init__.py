"""The registry gate: scan -> decide -> (patch) -> STRIP -> verdict, with a crash-safe registry protocol.

- `config`: `GateConfig` (scan / patch / strip settings, TOML settings file, reuse fingerprint);
- `state`: `GateState`, what one run carries from step to step;
- `steps`: fetch, validate, scan, patch, STRIP calibration, report;
- `verdict`: the claim / re-check / finish / fail protocol and the reuse rule;
- `runner`: `run_gate`, which strings them together inside one MLflow run.
"""
from .config import ConfigError, GateConfig, ScanSettings, CheckSettings
from .runner import GATE_EXPERIMENT, GateOutcome, run_gate
from .verdict import BLOCKED, ERROR, EXIT_CODES, PASSED, PATCHED, PENDING, GateSuperseded

__all__ = ["BLOCKED", "ConfigError", "ERROR", "EXIT_CODES", "GATE_EXPERIMENT", "GateConfig", "GateOutcome",
           "GateSuperseded", "PASSED", "PATCHED", "PENDING", "ScanSettings", "CheckSettings", "run_gate"]
