"""Per-input evidence from a model's answers on perturbed copies of the input, black-box.

STRIP (Gao et al.) reads one number from the N superimposed copies of an input: their mean
entropy (Eq. 2-4). A trigger that dominates the model makes every copy land on the target, so
that entropy is low. Two kinds of trojan escape it: a multi-target trojan splits each copy's
probability over its targets (high entropy, but *the same* distribution on every copy), and a
faint or blended trigger is washed out by superimposition on some copies. The statistics here
read the whole set of answers instead (all in bits; p_j is copy j's class distribution, p_x the
input's own, N copies; each is oriented so that a *low* value is trojan-like):

- ``entropy``          mean_j H(p_j)                              STRIP's Eq. 2-4
- ``dispersion``       mean_j JS(p_j, mean_j p_j)                 Jensen-Shannon spread around the
                                                                   copies' centroid (invariance of
                                                                   the whole probability vector)

Copy agreement (mutual information, top-class vote share, drift from the input's answer) and
other perturbation families were measured and not kept (docs/experiments.md, "Run-time check").
"""
from __future__ import annotations

import numpy as np

LOG2 = np.log(2.0)
STATISTICS = ("entropy", "dispersion")


def entr(p: np.ndarray) -> np.ndarray:
    """Elementwise -p ln p with 0 ln 0 = 0 (scipy.special.entr on probabilities, without importing scipy)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    np.log(p, out=out, where=p > 0)
    out *= p
    return np.negative(out, out=out)


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Base-2 entropy over the last axis (0 log 0 = 0)."""
    return entr(p).sum(axis=-1) / LOG2


def js_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits over the last axis (broadcasting)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = 0.5 * (p + q)
    return np.maximum(entropy_bits(m) - 0.5 * (entropy_bits(p) + entropy_bits(q)), 0.0)


def copy_statistics(p_self: np.ndarray, p_copies: np.ndarray) -> dict:
    """The statistics of the module doc for n inputs: p_self (n, K), p_copies (n, N, K) -> {name: (n,)}."""
    p_copies = np.asarray(p_copies, np.float64)
    centroid = p_copies.mean(axis=1)
    return {
        "entropy": entropy_bits(p_copies).mean(axis=1),
        "dispersion": js_bits(p_copies, centroid[:, None, :]).mean(axis=1),
    }
