"""STRIP (Gao et al., ACSAC'19): run-time detection of trigger-stamped inputs.

Public names resolve lazily (PEP 562): loading a boundary at serving time does not import the
calibration's data validation (great-expectations).
"""
from ..lazy import lazy_getattr

_EXPORTS = {"BLEND_RULES": "..copies", "DEFAULT_BLEND": "..copies", "superimpose": "..copies",
            "artifact_sha256": ".artifact", "calibrate_strip": ".calibration", "Strip": ".detector",
            "normalized_entropy": ".detector"}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
