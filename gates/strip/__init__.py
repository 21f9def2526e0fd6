"""STRIP (Gao et al., ACSAC'19): run-time detection of trigger-stamped inputs.

Public names resolve lazily (PEP 562): loading a boundary at serving time does not import the
calibration's data validation (great-expectations).
"""
_EXPORTS = {"BLEND_RULES": "..copies", "DEFAULT_BLEND": "..copies", "superimpose": "..copies",
            "artifact_sha256": ".artifact", "calibrate_strip": ".calibration", "Strip": ".detector",
            "normalized_entropy": ".detector"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
