"""STRIP (Gao et al., ACSAC'19): run-time detection of trigger-stamped inputs, and the guarded classifier."""
from .artifact import artifact_sha256
from .calibration import calibrate_strip
from .detector import BLEND_RULES, DEFAULT_BLEND, Strip, normalized_entropy, superimpose
from .guard import POLICIES, REJECTED_LABEL, GuardedClassifier

__all__ = ["BLEND_RULES", "DEFAULT_BLEND", "POLICIES", "REJECTED_LABEL", "GuardedClassifier", "Strip",
           "artifact_sha256", "calibrate_strip", "normalized_entropy", "superimpose"]
