"""A classifier guarded at run time: labels and trojan flags from any run-time detector.

The guard holds a served model's oracle and a fitted detector (the run-time check the gate attaches,
or STRIP as in the paper) and asks the detector's `predict` (the contract of `detector_base`): the
labels come from the same calls that score the inputs (each input travels with its copies where the
detector asks copies, rows in a fresh random order, so a model whose answer depends on a row's position cannot tell the client's
input from its copies). Admission already refuses models whose answers depend on the batch; this
is the second line. `trojan-gate check` and the served guarded model both predict through this class.
"""
from __future__ import annotations

import numpy as np

from .errors import ArtifactIntegrityError

SERVING_POLICIES = ("flag", "reject")
REJECTED_LABEL = -1


class GuardedClassifier:
    """Classifier + run-time guard (any fitted detector of the `detector_base` contract).

    Parameters
    ----------
    oracle : ModelOracle
        The served model (must be the model the detector was calibrated on).
    detector : RuntimeDetector
        Fitted, with a threshold.
    policy : str
        "flag" returns every label and marks suspects; "reject" also replaces a suspect's label by
        -1 and its probability by 0.0 (no class is vouched for).
    chunk_size : int
        Inputs the detector takes at once: the memory of a call is bounded by a chunk, whatever the
        number of inputs.
    """

    def __init__(self, oracle, detector, policy: str = "flag", chunk_size: int = 8192):
        if policy not in SERVING_POLICIES:
            raise ValueError(f"policy must be one of {SERVING_POLICIES}, not {policy!r}")
        detector.check_threshold()
        if detector.model_sha256_ != oracle.sha256:
            raise ArtifactIntegrityError(f"model sha256 mismatch: the boundary was calibrated on "
                                         f"{detector.model_sha256_}, the served model is {oracle.sha256}")
        if int(chunk_size) < 1:
            raise ValueError("chunk_size must be >= 1")
        self.oracle = oracle
        self.detector = detector
        self.policy = policy
        self.chunk_size = int(chunk_size)

    @classmethod
    def from_artifacts(cls, model, boundary_dir, policy: str = "flag", expected_sha256: str | None = None,
                       chunk_size: int = 8192, **oracle_kwargs) -> "GuardedClassifier":
        """Build oracle and detector from an ONNX file (or bytes) and a verified boundary directory."""
        from .oracle import ModelOracle
        from .runtime import load_check

        oracle = model if hasattr(model, "predict_proba") else ModelOracle(model, **oracle_kwargs)
        detector = load_check(boundary_dir, oracle, expected_sha256=expected_sha256)
        return cls(oracle, detector, policy=policy, chunk_size=chunk_size)

    def warm(self) -> "GuardedClassifier":
        """Build what the detector's calls need now (the copies graph of `copies_graph`, the hidden-output session
        of the activation statistic), so the first request does not pay for it."""
        if getattr(self.detector, "asks_copies", True):
            self.detector.copies_.graph_for(self.oracle)
        if "activation" in getattr(self.detector, "statistics", ()):
            self.oracle.hidden_session()
        return self

    @property
    def threshold(self) -> float:
        """The detector's threshold (flag at instance_score >= threshold)."""
        return self.detector.threshold_

    def predict(self, x) -> dict:
        """Per input: label (int64), probability, instance_score (higher = more trojan-like), is_trojaned
        (instance_score >= threshold), model_calls (the served model's inputs it cost: the input and its
        copies) and reference_calls (the reference classifier's); under policy "reject" a flagged input's
        label is -1 and its probability 0. Inputs go to the detector `chunk_size` at a time."""
        x = self.oracle.check_inputs(x)
        parts = [self._predict_chunk(x[s:s + self.chunk_size]) for s in range(0, len(x), self.chunk_size)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            parts = [self._predict_chunk(x)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _predict_chunk(self, x) -> dict:
        data = self.detector.predict(x)["data"]
        proba = np.asarray(data["proba"], np.float64)
        label, prob = proba.argmax(axis=1).astype(np.int64), proba.max(axis=1)
        flagged = np.asarray(data["is_trojaned"], bool)
        if self.policy == "reject":
            label[flagged] = REJECTED_LABEL
            prob[flagged] = 0.0
        return {"label": label, "probability": prob, "instance_score": np.asarray(data["instance_score"]),
                "is_trojaned": flagged, "model_calls": np.asarray(data["model_calls"]),
                "reference_calls": np.asarray(data["reference_calls"])}
