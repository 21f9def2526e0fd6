"""STRIP run-time trojan detection (Gao et al., "STRIP: A Defence Against Trojan Attacks").

An incoming image x is superimposed with N images drawn from a held-out bank; a trojaned
input keeps predicting the attacker's class whatever it is blended with, so the class
distributions of its perturbed copies have low entropy. The score of x is the normalised
entropy (Eq. 2-4):

    H_n = -sum_i y_i log2 y_i            (Eq. 2, class distribution of perturbed copy n)
    H   = (1 / N) * sum_n H_n            (Eq. 3-4)

and x is flagged as trojaned when H <= threshold (the paper's detection boundary), a low percentile of the
benign-entropy distribution of held-out images (Sec. V-D): a normal is fitted to the benign
entropies and threshold = norm.ppf(FRR, mean, std) (rule "normal", the paper's); the
empirical FRR-quantile of the same entropies is kept as well (rule "empirical").

How perturbations are drawn. Every input gets N *distinct* bank images, chosen by a keyed
hash of the input itself (see `draws`): the same input always meets the same bank images and
so always gets the same score, whatever else is in its batch and however often it is sent (the
paper draws afresh per input, which lets an attacker retry a stamped input until it passes).
The drawn images are superimposed with `BLEND_RULES[blend]`. When `fit` scores the held-out
images themselves (they are the bank), image i is never superimposed on itself.

Superimposition rules (`BLEND_RULES`):
- "average": 0.5 x + 0.5 x_bank (the open-source libraries' convention);
- "sum": clip(x + x_bank, 0, 1) (the paper's public code adds at full weight on 8-bit data,
  which saturates);
- "max": pixel-wise maximum(x, x_bank).

Default "max", chosen by measurement as the rule with the lowest FAR at preset FRR 1%
(`trojan-gate benchmark strip`, benchmarks/strip.md): small Fashion-MNIST lab CNNs, 2 epochs,
N=10, 2000 held-out, 2000 clean and 2000 trojaned test inputs; FAR per trigger
(patch / pattern / blend / multi-target) and mean:
    average  33.95 / 20.65 / 5.05 / 100 %   mean 39.91 %
    sum       8.30 /  2.40 / 3.10 / 100 %   mean 28.45 %
    max       4.40 /  0.85 / 2.20 / 100 %   mean 26.86 %
A likely reason: "max" keeps a bright trigger at full strength where "average" halves it,
and saturates less of the input than "sum".

All N perturbations of a batch of inputs go to the model in one oracle call.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.special import entr
from tqdm.auto import tqdm

from ..errors import ArtifactIntegrityError
from .artifact import artifact_sha256, read_artifact, utc_now, versions, write_artifact
from .draws import detector_key, input_seeds, keyed_indices

__all__ = ["BLEND_RULES", "DEFAULT_BLEND", "Strip", "artifact_sha256", "superimpose", "normalized_entropy"]

LOG2 = math.log(2.0)
RULES = ("normal", "empirical")
DEFAULT_BLEND = "max"


def _average(x, b, out):
    np.add(x, b, out=out)
    out *= 0.5
    return out


def _sum(x, b, out):
    np.add(x, b, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _max(x, b, out):
    return np.maximum(x, b, out=out)


BLEND_RULES = {"average": _average, "sum": _sum, "max": _max}


def superimpose(x: np.ndarray, b: np.ndarray, rule: str = DEFAULT_BLEND, out: np.ndarray | None = None) -> np.ndarray:
    """Superimpose bank images `b` on inputs `x` (broadcasting) with one of BLEND_RULES."""
    if rule not in BLEND_RULES:
        raise ValueError(f"unknown blend rule {rule!r}; choose from {tuple(BLEND_RULES)}")
    if out is None:
        out = np.empty(np.broadcast_shapes(x.shape, b.shape), dtype=np.float32)
    return BLEND_RULES[rule](x, b, out)


def normalized_entropy(proba: np.ndarray, n_perturbations: int) -> np.ndarray:
    """Eq. 2-4: mean over each input's N perturbed copies of the base-2 class entropy.

    `proba` holds the (n * N, K) class distributions, the N copies of input i in rows
    i*N .. i*N + N - 1; returns (n,) entropies (0 log 0 = 0).
    """
    h = entr(np.asarray(proba, dtype=np.float64)).sum(axis=1) / LOG2  # Eq. 2
    return h.reshape(-1, n_perturbations).mean(axis=1)  # Eq. 3-4


class Strip:
    """STRIP detector over a black-box ModelOracle (Alibi Detect's fit / infer_threshold / predict).

    Parameters
    ----------
    model : ModelOracle (or anything with predict_proba, check_inputs and sha256)
    n_perturbations : N, superimposed bank images per input
    blend : superimposition rule, a key of BLEND_RULES
    seed : keys the draws (with the model's sha256): which bank images each input meets
    batch_size : incoming inputs per oracle call (each brings N perturbed copies);
        default keeps a call near 32k images
    rule : threshold in force, "normal" (norm.ppf(frr, mean, std)) or "empirical" (quantile)
    progress : tqdm bar when a call needs several oracle batches

    Attributes after fit / infer_threshold: bank_, benign_scores_, mean_, std_, frr_,
    threshold_ (in force), normal_threshold_, empirical_threshold_, model_sha256_,
    extra (dict saved with the artifact).
    """

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

    # -- building blocks ---------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        if self.batch_size:
            return int(self.batch_size)
        return max(1, 32768 // (self.n_perturbations + 1))

    def _check_fitted(self, need_threshold=False):
        if self.bank_ is None:
            raise RuntimeError("Strip is not fitted: call fit(heldout_x) first")
        if need_threshold and self.threshold_ is None:
            raise RuntimeError("no threshold: call infer_threshold(frr) first")

    def perturb(self, x: np.ndarray, exclude=None, out: np.ndarray | None = None) -> np.ndarray:
        """(n * N, C, H, W) perturbed copies: input i's N copies in rows i*N .. i*N + N - 1.

        Draws N distinct bank images per input from its own bytes (never bank[exclude[i]] for
        input i), gathers them straight into `out` and superimposes x in place.
        """
        return self.copies_at(x, self.draw_indices(x, exclude), out=out)

    def draw_indices(self, x: np.ndarray, exclude=None) -> np.ndarray:
        """(n, N) bank indices of each input's copies, drawn from its own bytes (see `perturb`)."""
        self._check_fitted()
        key = detector_key(self.seed, self.model.sha256)
        return keyed_indices(input_seeds(x, key), len(self.bank_), self.n_perturbations, exclude)

    def copies_at(self, x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(n * k, C, H, W) copies of x (n inputs) superimposed on bank[idx] (n, k), input i's in rows
        i*k .. i*k + k - 1: gathered straight into `out` (float32 of that shape, when given) and
        superimposed in place. `perturb` is this with all N draws; the run-time check asks it stage by stage."""
        n, k = idx.shape
        shape = (n * k,) + self.bank_.shape[1:]
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
        np.take(self.bank_, idx.ravel(), axis=0, out=out)
        view = out.reshape((n, k) + self.bank_.shape[1:])
        BLEND_RULES[self.blend](view, x[:, None], view)
        return out

    def entropy_from_proba(self, proba: np.ndarray) -> np.ndarray:
        """Normalised entropy H (Eq. 2-4) from the (n * N, K) answers for perturbed copies."""
        return normalized_entropy(proba, self.n_perturbations)

    def _score(self, x, exclude=None, desc="strip score") -> np.ndarray:
        size = self.chunk_size
        starts = range(0, len(x), size)
        scores = np.empty(len(x), dtype=np.float64)
        for s in tqdm(starts, desc=desc, disable=not self.progress or len(starts) <= 1, leave=False):
            xc = x[s:s + size]
            ex = None if exclude is None else exclude[s:s + size]
            proba = self.model.predict_proba(self.perturb(xc, ex))
            scores[s:s + len(xc)] = self.entropy_from_proba(proba)
        return scores

    # -- sklearn-style API ------------------------------------------------------------
    def fit(self, heldout_x) -> "Strip":
        """Keep held-out images as the perturbation bank; compute their benign entropies.

        Image i's N partners come from the other held-out images (never itself).
        """
        x = self.model.check_inputs(heldout_x)
        if len(x) < self.n_perturbations + 1:
            raise ValueError(f"need at least N + 1 = {self.n_perturbations + 1} held-out images, got {len(x)}")
        self.bank_ = x.copy()
        self.model_sha256_ = self.model.sha256
        self.created_at_ = utc_now()
        with self.model.phase("strip-fit"):
            self.benign_scores_ = self._score(x, exclude=np.arange(len(x)), desc="strip fit")
        self.mean_ = float(self.benign_scores_.mean())
        self.std_ = float(self.benign_scores_.std(ddof=1))
        self.threshold_ = None
        return self

    def infer_threshold(self, frr: float = 0.01, rule: str | None = None) -> "Strip":
        """Threshold at preset FRR (Sec. V-D): normal ppf and empirical quantile; `rule` picks one."""
        self._check_fitted()
        if not 0.0 < frr < 1.0:
            raise ValueError(f"frr must be in (0, 1), got {frr}")
        if rule is not None:
            if rule not in RULES:
                raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
            self.rule = rule
        self.frr_ = float(frr)
        self.normal_threshold_ = (float(stats.norm.ppf(frr, loc=self.mean_, scale=self.std_)) if self.std_ > 0
                                  else self.mean_)  # degenerate: every benign entropy equal
        self.empirical_threshold_ = float(np.quantile(self.benign_scores_, frr))
        self.threshold_ = self.normal_threshold_ if self.rule == "normal" else self.empirical_threshold_
        return self

    def score(self, x) -> np.ndarray:
        """Normalised entropy H (Eq. 2-4) of each input; low means trojan-like."""
        self._check_fitted()
        x = self.model.check_inputs(x)
        with self.model.phase("strip-score"):
            return self._score(x)

    def predict(self, x, return_instance_score: bool = True) -> dict:
        """Alibi Detect-style result: data.instance_score, data.is_trojaned (score <= threshold), data.threshold."""
        self._check_fitted(need_threshold=True)
        s = self.score(x)
        return {
            "data": {"instance_score": s if return_instance_score else None,
                     "is_trojaned": s <= self.threshold_,
                     "threshold": self.threshold_},
            "meta": self.meta(),
        }

    def meta(self) -> dict:
        return {"name": type(self).__name__, "detector_type": "trojan", "data_type": "image", "online": False,
                "n_perturbations": self.n_perturbations, "blend": self.blend, "rule": self.rule,
                "frr": getattr(self, "frr_", None), "seed": self.seed,
                "model_sha256": getattr(self, "model_sha256_", None)}

    # -- artifact ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        self._check_fitted(need_threshold=True)
        return {
            "n_perturbations": self.n_perturbations, "blend": self.blend, "seed": self.seed,
            "mean": self.mean_, "std": self.std_, "frr": self.frr_, "rule": self.rule,
            "threshold": self.threshold_, "normal_threshold": self.normal_threshold_,
            "empirical_threshold": self.empirical_threshold_,
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
            det.bank_ = bank
            det.model_sha256_ = doc["model_sha256"]
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
