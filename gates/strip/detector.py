"""STRIP run-time trojan detection (Gao et al., "STRIP: A Defence Against Trojan Attacks").

An incoming image x is superimposed with N images drawn from a held-out bank; a trojaned
input keeps predicting the attacker's class whatever it is blended with, so the class
distributions of its perturbed copies have low entropy. The score of x is the normalised
entropy (Eq. 2-4):

    H_n = -sum_i y_i log2 y_i            (Eq. 2, class distribution of perturbed copy n)
    H   = (1 / N) * sum_n H_n            (Eq. 3-4)

and x is trojaned when H is at or under the paper's detection boundary, a low percentile of the
benign entropies of held-out images (Sec. V-D). Here every detector scores higher for more
trojan-like inputs, so the instance score is s(x) = -H(x), a normal is fitted to the benign
scores and

    threshold = norm.ppf(1 - FRR, mean_s, std_s)     (rule "normal", the paper's fit, mirrored)

with the empirical (1 - FRR)-quantile of the same scores kept as well (rule "empirical"); x is
flagged when s(x) >= threshold, which is the paper's H <= boundary, unchanged in FAR and FRR.

How perturbations are drawn: see `gates.copies` (N distinct bank images per input, keyed by the
input's own bytes, so the same input always gets the same score; superimposed by the rule
"max" by default). When `fit` scores the held-out images themselves (they are the bank), image i
is never superimposed on itself.

All N perturbations of a batch of inputs go to the model in one oracle call; `predict` adds the
inputs themselves to that call (Algorithm 1: "all the perturbed inputs along with x itself are
concurrently fed into the deployed DNN model"), rows in a fresh random order.
"""

from __future__ import annotations

import math

import numpy as np

from ..copies import BLEND_RULES, DEFAULT_BLEND, KeyedCopies, ask_shuffled, superimpose
from ..detector_base import SCORE_DIRECTION, RuntimeDetector
from ..errors import ArtifactIntegrityError
from ..artifact_files import utc_now, versions
from ..runtime.evidence import entr
from .artifact import artifact_sha256, read_artifact, write_artifact

__all__ = ["BLEND_RULES", "DEFAULT_BLEND", "Strip", "artifact_sha256", "superimpose", "normalized_entropy"]

LOG2 = math.log(2.0)
RULES = ("normal", "empirical")


def normalized_entropy(proba: np.ndarray, n_perturbations: int) -> np.ndarray:
    """Eq. 2-4: mean over each input's N perturbed copies of the base-2 class entropy.

    `proba` holds the (n * N, K) class distributions, the N copies of input i in rows
    i*N .. i*N + N - 1; returns (n,) entropies (0 log 0 = 0).
    """
    h = entr(np.asarray(proba, dtype=np.float64)).sum(axis=1) / LOG2  # Eq. 2
    return h.reshape(-1, n_perturbations).mean(axis=1)  # Eq. 3-4


class Strip(RuntimeDetector):
    """STRIP detector over a black-box ModelOracle (the run-time detector contract, `detector_base`).

    Parameters
    ----------
    model : ModelOracle (or anything with predict_proba, check_inputs and sha256)
    n_perturbations : int
        N, superimposed bank images per input.
    blend : str
        Superimposition rule, a key of BLEND_RULES.
    seed : int
        Keys the draws (with the model's sha256): which bank images each input meets.
    batch_size : int, optional
        Incoming inputs per oracle call (each brings N perturbed copies); default keeps a call
        near 32k images.
    rule : str
        Threshold in force, "normal" (norm.ppf(1 - frr, mean, std) of the benign scores) or
        "empirical" (their (1 - frr)-quantile).
    progress : bool
        tqdm bar when a call needs several oracle batches.

    Attributes after fit / infer_threshold: bank_, benign_scores_ (-H of the held-out images),
    mean_, std_, frr_, threshold_ (in force), normal_threshold_, empirical_threshold_,
    model_sha256_, extra (dict saved with the artifact).
    """

    kind = "strip"

    def __init__(self, model, n_perturbations: int = 10, blend: str = DEFAULT_BLEND, seed: int = 0,
                 batch_size: int | None = None, rule: str = "normal", progress: bool = True):
        if blend not in BLEND_RULES:
            raise ValueError(f"unknown blend rule {blend!r}; choose from {tuple(BLEND_RULES)}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
        if int(n_perturbations) < 1:
            raise ValueError("n_perturbations must be >= 1")
        self.model = model
        self.n_perturbations = int(n_perturbations)
        self.blend = blend
        self.seed = int(seed)
        self.batch_size = batch_size
        self.rule = rule
        self.progress = progress
        self.extra: dict = {}
        self.threshold_ = None
        self.bank_ = None
        self.created_at_ = None
        self._order = np.random.default_rng()  # OS entropy: the row order is never predictable

    # -- building blocks ---------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        """Incoming inputs per oracle call: `batch_size`, or as many as keep a call near 32k images."""
        if self.batch_size:
            return int(self.batch_size)
        return max(1, 32768 // (self.n_perturbations + 1))

    def attach_bank(self, bank: np.ndarray, model_sha256: str) -> None:
        """Use `bank` as the perturbation bank, with draws keyed to the model `model_sha256`."""
        self.bank_ = bank
        self.model_sha256_ = model_sha256
        self.copies_ = KeyedCopies(bank, self.n_perturbations, self.blend, self.seed, model_sha256)

    def perturb(self, x: np.ndarray, exclude=None, out: np.ndarray | None = None) -> np.ndarray:
        """(n * N, C, H, W) perturbed copies: input i's N copies in rows i*N .. i*N + N - 1 (see `copies`)."""
        self.check_fitted()
        return self.copies_.perturb(x, exclude, out=out)

    def entropy_from_proba(self, proba: np.ndarray) -> np.ndarray:
        """Normalised entropy H (Eq. 2-4) from the (n * N, K) answers for perturbed copies."""
        return normalized_entropy(proba, self.n_perturbations)

    def _score(self, x, exclude=None, desc="strip score") -> np.ndarray:
        from tqdm.auto import tqdm

        size = self.chunk_size
        starts = range(0, len(x), size)
        scores = np.empty(len(x), dtype=np.float64)
        for s in tqdm(starts, desc=desc, disable=not self.progress or len(starts) <= 1, leave=False):
            xc = x[s:s + size]
            ex = None if exclude is None else exclude[s:s + size]
            _, p_copies = self.copies_.ask(self.model, xc, self.copies_.draw_indices(xc, ex), self._order,
                                           with_self=False)
            scores[s:s + len(xc)] = -self.entropy_from_proba(p_copies.reshape(-1, p_copies.shape[-1]))
        return scores

    # -- the detector contract ----------------------------------------------------------
    def fit(self, heldout_x, heldout_y=None) -> "Strip":
        """Keep held-out images as the perturbation bank; score them (-H; image i never meets itself).
        STRIP needs no labels: `heldout_y` is accepted for the shared contract and not used."""
        x = self.model.check_inputs(heldout_x)
        if len(x) < self.n_perturbations + 1:
            raise ValueError(f"need at least N + 1 = {self.n_perturbations + 1} held-out images, got {len(x)}")
        self.attach_bank(x.copy(), self.model.sha256)
        self.created_at_ = utc_now()
        with self.model.phase("strip-fit"):
            self.benign_scores_ = self._score(x, exclude=np.arange(len(x)), desc="strip fit")
        self.mean_ = float(self.benign_scores_.mean())
        self.std_ = float(self.benign_scores_.std(ddof=1))
        self.threshold_ = None
        return self

    def infer_threshold(self, frr: float = 0.01, rule: str | None = None) -> "Strip":
        """Threshold at preset FRR (Sec. V-D, mirrored): normal ppf and empirical quantile at 1 - frr."""
        from scipy import stats

        self.check_fitted()
        if not 0.0 < frr < 1.0:
            raise ValueError(f"frr must be in (0, 1), got {frr}")
        if rule is not None:
            if rule not in RULES:
                raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
            self.rule = rule
        self.frr_ = float(frr)
        self.normal_threshold_ = (float(stats.norm.ppf(1.0 - frr, loc=self.mean_, scale=self.std_)) if self.std_ > 0
                                  else self.mean_)  # degenerate: every benign score equal
        self.empirical_threshold_ = float(np.quantile(self.benign_scores_, 1.0 - frr))
        self.threshold_ = self.normal_threshold_ if self.rule == "normal" else self.empirical_threshold_
        return self

    def score(self, x) -> np.ndarray:
        """s(x) = -H(x), the negated normalised entropy (Eq. 2-4): higher means more trojan-like."""
        self.check_fitted()
        x = self.model.check_inputs(x)
        with self.model.phase("strip-score"):
            return self._score(x)

    def _answer(self, x) -> dict:
        """Labels and scores in one call per chunk: the inputs and their N copies, rows shuffled (copies built
        inside ONNX Runtime where the model allows it, `copies_graph`)."""
        x = self.model.check_inputs(x)
        n, big_n, size = len(x), self.n_perturbations, self.chunk_size
        proba_self = np.empty((n, self.model.n_classes), dtype=np.float64)
        score = np.empty(n, dtype=np.float64)
        with self.model.phase("strip-predict"):
            for s in range(0, n, size):
                xc = x[s:s + size]
                p_self, p_copies = self.copies_.ask(self.model, xc, self.copies_.draw_indices(xc), self._order)
                proba_self[s:s + len(xc)] = p_self
                score[s:s + len(xc)] = -self.entropy_from_proba(p_copies.reshape(-1, p_copies.shape[-1]))
        return {"instance_score": score, "proba": proba_self, "model_calls": np.full(n, big_n + 1)}

    def meta(self) -> dict:
        """The contract's meta plus N, the blend rule, the threshold rule and the seed."""
        return {**super().meta(), "n_perturbations": self.n_perturbations, "blend": self.blend, "rule": self.rule,
                "seed": self.seed}

    def describe(self) -> dict:
        """The settings and threshold of the fitted check, as the gate logs, tags and reports them."""
        self.check_threshold()
        return {"kind": self.kind, "threshold": float(self.threshold_), "frr": float(self.frr_), "rule": self.rule,
                "n_perturbations": self.n_perturbations, "blend": self.blend, "seed": self.seed,
                "n_calibration": int(len(self.bank_)), "score_direction": SCORE_DIRECTION, "mean": self.mean_,
                "std": self.std_, "empirical_threshold": self.empirical_threshold_,
                "normal_threshold": self.normal_threshold_}

    # -- artifact ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The boundary document (everything `load` needs, the benign scores included)."""
        self.check_threshold()
        return {
            "n_perturbations": self.n_perturbations, "blend": self.blend, "seed": self.seed,
            "mean": self.mean_, "std": self.std_, "frr": self.frr_, "rule": self.rule,
            "threshold": self.threshold_, "normal_threshold": self.normal_threshold_,
            "empirical_threshold": self.empirical_threshold_, "score_direction": SCORE_DIRECTION,
            "n_benign": int(len(self.benign_scores_)),
            "benign_scores": [float(v) for v in self.benign_scores_],
            "created_at": self.created_at_, "model_sha256": self.model_sha256_,
            "versions": versions(), "extra": dict(self.extra),
        }

    def save(self, directory):
        """Write boundary.json + bank.npy (see `artifact`); returns the directory."""
        return write_artifact(directory, self.to_dict(), self.bank_)

    @classmethod
    def load(cls, directory, model, expected_sha256: str | None = None, **kwargs) -> "Strip":
        """Restore a saved detector for `model`, refusing any hash mismatch (ArtifactIntegrityError).

        `model` is a ModelOracle (or a path / bytes of the ONNX file, wrapped in one);
        `expected_sha256` optionally pins the whole artifact (see artifact_sha256).
        """
        if not hasattr(model, "predict_proba"):
            from ..oracle import ModelOracle

            model = ModelOracle(model)
        doc, bank = read_artifact(directory, model_sha256=model.sha256, expected_sha256=expected_sha256,
                                  input_shape=model.input_shape)
        try:
            det = cls(model, n_perturbations=doc["n_perturbations"], blend=doc["blend"], seed=doc["seed"],
                      rule=doc["rule"], **kwargs)
            det.attach_bank(bank, doc["model_sha256"])
            det.benign_scores_ = np.asarray(doc["benign_scores"], dtype=np.float64)
            det.mean_, det.std_, det.frr_ = float(doc["mean"]), float(doc["std"]), float(doc["frr"])
            det.normal_threshold_ = float(doc["normal_threshold"])
            det.empirical_threshold_ = float(doc["empirical_threshold"])
            det.threshold_ = float(doc["threshold"])
            det.created_at_ = doc.get("created_at")
            det.extra = dict(doc.get("extra") or {})
            det.versions_ = doc.get("versions", {})
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactIntegrityError(f"boundary.json lacks or mangles a field: {e}") from e
        return det
