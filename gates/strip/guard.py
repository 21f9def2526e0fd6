"""A classifier guarded at run time: labels and trojan flags, by STRIP or the run-time check.

With a `RuntimeCheck` (gates.runtime, the default the gate attaches) the labels come from the
check's first call, which carries the inputs with their first copies. With a `Strip` detector:

For a batch of n inputs the guard builds one array holding the n inputs and their n * N STRIP
perturbations (Algorithm 1: "all the perturbed inputs along with x itself are concurrently fed
into the deployed DNN model"), sends it to the oracle in a single call, takes labels from the
inputs' rows and the normalised entropy (Eq. 2-4) from the rest. The rows go to the model in
a fresh random order every call: a model whose answer depends on a row's position or its
neighbours (a trojan that fires only in row 0, say) cannot tell the client's input from its
perturbations. Admission already refuses models whose answers depend on the batch; this is
the second line.
`trojan-gate check` and the served guarded model both predict through this class.
"""
from __future__ import annotations

import numpy as np

from ..errors import ArtifactIntegrityError
from .detector import Strip

POLICIES = ("flag", "reject")
REJECTED_LABEL = -1


class GuardedClassifier:
    """Classifier + run-time guard (a fitted RuntimeCheck or Strip).

    Parameters
    ----------
    oracle : ModelOracle of the served model (must be the model the detector was calibrated on)
    detector : fitted RuntimeCheck or Strip with a threshold
    policy : "flag" returns every label and marks suspects; "reject" also replaces a
        suspect's label by -1 and its probability by 0.0 (no class is vouched for)
    batch_size : inputs per oracle call (default: the detector's chunk size)
    """

    def __init__(self, oracle, detector: Strip, policy: str = "flag", batch_size: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if detector.threshold_ is None:
            raise ValueError("the detector has no threshold: fit it and call infer_threshold first")
        if detector.model_sha256_ != oracle.sha256:
            raise ArtifactIntegrityError(f"model sha256 mismatch: the boundary was calibrated on "
                                         f"{detector.model_sha256_}, the served model is {oracle.sha256}")
        self.oracle = oracle
        self.detector = detector
        self.policy = policy
        self.batch_size = batch_size
        self._order = np.random.default_rng()  # OS entropy: the row order is never predictable

    @classmethod
    def from_artifacts(cls, model, boundary_dir, policy: str = "flag", expected_sha256: str | None = None,
                       **oracle_kwargs) -> "GuardedClassifier":
        """Build oracle and detector from an ONNX file (or bytes) and a verified boundary directory."""
        from ..oracle import ModelOracle

        oracle = model if hasattr(model, "predict_proba") else ModelOracle(model, **oracle_kwargs)
        from ..runtime import load_check

        detector = load_check(boundary_dir, oracle, expected_sha256=expected_sha256)
        return cls(oracle, detector, policy=policy)

    @property
    def threshold(self) -> float:
        return self.detector.threshold_

    def predict(self, x) -> dict:
        """Per input: label (int64), probability, instance_score (STRIP: the normalised entropy H, Eq. 2-4;
        a RuntimeCheck: its combined min-p) and is_trojaned (score <= threshold); under policy "reject" a
        flagged input's label is -1."""
        x = self.oracle.check_inputs(x)
        if hasattr(self.detector, "decide"):  # the run-time check beyond STRIP (gates.runtime)
            out = self.detector.decide(x)
            return self._decided(out["proba"].argmax(axis=1), out["proba"].max(axis=1), out["instance_score"])
        n, big_n = len(x), self.detector.n_perturbations
        size = int(self.batch_size or self.detector.chunk_size)
        label = np.empty(n, dtype=np.int64)
        prob = np.empty(n, dtype=np.float64)
        score = np.empty(n, dtype=np.float64)
        with self.oracle.phase("guard"):
            for s in range(0, n, size):
                xc = x[s:s + size]
                m = len(xc)
                buf = np.empty((m * (big_n + 1),) + x.shape[1:], dtype=np.float32)
                buf[:m] = xc
                self.detector.perturb(xc, out=buf[m:])
                order = self._order.permutation(len(buf))
                proba = np.empty((len(buf), self.oracle.n_classes), dtype=np.float64)
                proba[order] = self.oracle.predict_proba(buf[order])  # one call, rows shuffled
                label[s:s + m] = proba[:m].argmax(axis=1)
                prob[s:s + m] = proba[:m].max(axis=1)
                score[s:s + m] = self.detector.entropy_from_proba(proba[m:])
        return self._decided(label, prob, score)

    def _decided(self, label, prob, score) -> dict:
        label, prob = np.asarray(label, np.int64).copy(), np.asarray(prob, np.float64).copy()
        flagged = score <= self.detector.threshold_
        if self.policy == "reject":
            label[flagged] = REJECTED_LABEL
            prob[flagged] = 0.0
        return {"label": label, "probability": prob, "instance_score": score, "is_trojaned": flagged}
