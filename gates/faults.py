"""Fault injection for the crash-safety tests: SIGKILL this process at a named point.

`checkpoint(point)` does nothing unless the environment holds `TROJAN_GATE_FAULT=<point>[#<n>]`;
then the n-th time (default the first) the process reaches `point` it sends itself SIGKILL, as an
operator's `kill -9` or an out-of-memory killer would, with no chance to clean up. The points sit
between the gate's registry writes and inside its long phases (see `POINTS`), so a test can check
that the registry protocol leaves no alias on an unverified version wherever a gate dies.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "TROJAN_GATE_FAULT"
POINTS = (
    "intake.logged", "intake.registered",                       # intake
    "gate.claimed", "gate.fetched", "gate.validated",            # the gate's first steps
    "scan.references", "scan.measured", "gate.scanned",          # the scan
    "patch.fitted", "patch.rescanned", "patch.registered",       # patching
    "check.fitted", "check.release-signed", "check.attached",    # STRIP calibration and the guarded model
    "registry.tag", "registry.alias-dropped", "registry.alias-set",  # every single registry write
    "verdict.tags", "verdict.decided", "verdict.aliased", "verdict.done", "verdict.failed",
    "verdict.revoked",
)
_hits: Counter = Counter()


def checkpoint(point: str):
    """SIGKILL this process here if `TROJAN_GATE_FAULT` names `point` (and this is its n-th hit)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("#")
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
