"""The run-time check beyond STRIP: several kinds of evidence per input, one calibrated decision.

For an input x the check asks the served model about x itself and about N copies of x
superimposed on held-out images (STRIP's perturbations, drawn from x's own bytes), and asks a
*reference classifier* the defender trained on half of the held-out set about x. From the
answers it reads (all oriented so that low = trojan-like; see `evidence`):

- ``entropy``     STRIP's mean entropy of the copies (Eq. 2-4);
- ``dispersion``  the Jensen-Shannon spread of the copies' probability vectors around their
                  centroid: a multi-target trojan answers every copy with the same split over its
                  targets, so its copies do not spread even though each has high entropy;
- ``reference``   minus the Jensen-Shannon divergence between the served model's answer on x and
                  the reference classifier's: a trigger hijacks the served model only, so a stamped
                  input is answered one way by the model and another by a clean reference, while
                  a clean input is answered alike (beyond the paper: a purify-and-compare check in
                  which the "purifier" is a clean model of the same task);
- ``activation``  minus the Mahalanobis distance of the served model's own last hidden features from
                  the clean mean of the class it answers (`activations`; white-box, read from the same
                  call that answers x): a trigger drives those features where clean images of its
                  target class never go.

Combination (a one-class test on benign statistics): each statistic becomes a one-sided empirical
p-value against the benign calibration images, p_s(x) = (#{benign <= s(x)} + 1) / (n + 1), and the
instance score is the smallest of them, min_s p_s(x) (low = trojan-like). The threshold is the
preset-FRR quantile of the *leave-one-out* min-p over the calibration images (each image's own
value excluded from its p-values), so the calibration does not flatter itself; the realised FRR
comes with its Clopper-Pearson 95% interval for the calibration size.

Adaptive N (a sequential test): the copies are asked in stages (by default 1, 3, then N). After a
stage the partial min-p is compared with a stage bound; an input whose partial evidence is clearly
benign (partial min-p above the bound) is accepted without the remaining copies. A stage bound is
the 0.9 quantile of the partial min-p that the calibration images *flagged at full N* had at that
stage, so on the calibration set early stopping keeps about nine in ten of the images the full
test flags asking (the quantile 1.0 keeps all of them, at about 1.6 more calls per clean input).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .evidence import copy_statistics, js_bits

STATISTICS = ("entropy", "dispersion", "reference", "activation")
# The student's disagreement and the model's own hidden features: on the lab zoo (the tuning set) the pair had the
# lowest worst-case FAR at today's mean FRR, and entropy beside them only spent FRR budget (docs/experiments.md,
# "How the activation statistic joins"); without a copy statistic the model is asked once per input.
# Dispersion: little gain, a draw-sensitive low tail.
DEFAULT_STATISTICS = ("reference", "activation")
DEFAULT_STAGES = (1, 3)  # copies asked before each early-stopping decision
STAGE_QUANTILE, STAGE_MARGIN = 0.9, 1.0  # stage bound: this quantile of the flagged images' partial min-p, times margin


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for a rate k / n."""
    from scipy import stats as sps

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(sps.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(sps.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


@dataclass
class Calibration:
    """Benign values of each statistic (sorted), per stage of copies; the threshold and stage bounds."""

    benign: dict  # stage (number of copies) -> {statistic: sorted benign values}
    threshold: float = 0.0
    stage_bounds: dict = field(default_factory=dict)  # stage -> partial min-p above which an input is accepted
    frr: float = 0.01
    realised_frr: float = 0.0
    frr_interval: tuple = (0.0, 1.0)
    n_calibration: int = 0
    weights: dict | None = None  # statistic -> share of the FRR budget (None: equal shares)

    def p_values(self, stage: int, values: dict) -> np.ndarray:
        """(n, S) one-sided empirical p-values of `values` {statistic: (n,)} against the benign set."""
        cols = []
        for name, v in values.items():
            ref = self.benign[stage][name]
            cols.append((np.searchsorted(ref, np.asarray(v), side="right") + 1) / (len(ref) + 1))
        return np.stack(cols, axis=1)

    def combined(self, stage: int, values: dict) -> np.ndarray:
        """(n,) the weighted min-p of `values` (see `weighted_min`); plain min p with equal weights."""
        return weighted_min(self.p_values(stage, values), list(values), self.weights)


def weighted_min(p: np.ndarray, names, weights: dict | None) -> np.ndarray:
    """min_s p_s / (S w_s) over the S statistics `names` (columns of p), w_s summing to 1: a weighted
    Bonferroni split of the FRR budget; equal weights give min_s p_s."""
    if not weights:
        return p.min(axis=1)
    w = np.array([float(weights[n]) for n in names])
    return (p / (len(names) * w / w.sum())).min(axis=1)


def check_weights(weights, statistics) -> dict | None:
    """Validated weights {statistic: positive number} covering exactly `statistics` (None: equal)."""
    if weights is None:
        return None
    weights = {str(k): float(v) for k, v in dict(weights).items()}
    if set(weights) != set(statistics) or not all(np.isfinite(v) and v > 0 for v in weights.values()):
        raise ValueError(f"weights must give every statistic of {list(statistics)} a positive weight, not {weights}")
    return weights


def statistics_at(p_self, p_copies, p_ref, names, activation=None) -> dict:
    """The chosen statistics from the model's answers on x (n, K), its copies (n, k, K) and the reference's (n, K);
    `activation` (n,) is the activation statistic, read once per input (`ClassFeatureNull.statistic`)."""
    out = {} if activation is None else {"activation": np.asarray(activation, np.float64)}
    if "entropy" in names or "dispersion" in names:
        st = copy_statistics(p_self, p_copies)
        out.update({k: st[k] for k in ("entropy", "dispersion") if k in names})
    if "reference" in names:
        out["reference"] = -js_bits(p_self, p_ref)
    return {k: out[k] for k in names}


def leave_one_out_min_p(values: dict, weights: dict | None = None) -> np.ndarray:
    """(Weighted) min_s p_s over calibration images with each image's own value left out of its p-values."""
    cols = []
    for v in values.values():
        v = np.asarray(v)
        order = np.sort(v)
        below = np.searchsorted(order, v, side="right") - 1  # others at or below (minus itself)
        cols.append((below + 1) / len(v))
    return weighted_min(np.stack(cols, axis=1), list(values), weights)


def calibrate(stage_values: dict, frr: float, stages, margin: float = STAGE_MARGIN,
              stage_quantile: float = STAGE_QUANTILE, weights: dict | None = None) -> Calibration:
    """Fit the min-p test at preset `frr` from benign statistics per stage {stage: {statistic: (n,)}}.

    A stage bound is `margin` times the `stage_quantile` quantile of the partial min-p of the calibration
    images flagged at full N (quantile 1.0: their maximum, so early stopping never loses one of them; the
    default 0.9 lets a tenth of them stop early, which measured no FAR change on the lab zoo and about
    2.9 instead of 4.5 calls per clean input: docs/experiments.md). `weights` splits the FRR budget between
    the statistics (`weighted_min`; None: equal shares, the plain min-p test)."""
    full = max(stage_values)
    cal = Calibration(benign={s: {k: np.sort(np.asarray(v)) for k, v in vals.items()} for s, vals in stage_values.items()},
                      frr=float(frr), weights=weights)
    loo = leave_one_out_min_p(stage_values[full], weights)
    n = len(loo)
    cal.threshold = float(np.quantile(loo, frr, method="lower"))
    flagged = loo <= cal.threshold
    k = int(flagged.sum())
    cal.realised_frr, cal.frr_interval, cal.n_calibration = k / n, clopper_pearson(k, n), n
    for s in stages:
        if s >= full:
            continue
        partial = leave_one_out_min_p(stage_values[s], weights)
        worst = float(np.quantile(partial[flagged], stage_quantile)) if flagged.any() else cal.threshold
        cal.stage_bounds[int(s)] = max(worst, cal.threshold) * margin
    return cal
