"""STRIP (Gao et al., ACSAC'19): run-time detection of trigger-stamped inputs."""
from ..copies import BLEND_RULES, DEFAULT_BLEND, superimpose
from .artifact import artifact_sha256
from .calibration import calibrate_strip
from .detector import Strip, normalized_entropy

__all__ = ["BLEND_RULES", "DEFAULT_BLEND", "Strip", "artifact_sha256", "calibrate_strip", "normalized_entropy",
           "superimpose"]
