"""Left-tail double-MAD outlier test on per-class trigger statistics (DeepInspect Sec. 3.3, Eq. 7).

A trojan target needs an abnormally *small* trigger, so only the left tail matters:

- m is the median of all statistics (numpy's median: an even-sized list gives the mean of
  the two middle values; `torch.median` would return the lower one);
- the left subgroup is every statistic strictly below m;
- mad = 1.4826 * median(|s - m|) over the left subgroup (1.4826 makes the MAD a consistent
  estimator of a normal standard deviation);
- the deviation factor is df = (m - s) / mad for left points and 0 for the rest;
- every class with df > c is flagged, so a multi-target trojan reports all its targets.

When the left subgroup is empty (all statistics equal, or ties at the median) mad is 0 and
every df is 0: nothing stands out, nothing is flagged.

Cutoff and significance: Eq. 7 as printed is garbled (read literally, 1 - Q(2) = 0.977 is
not a significance level). The project follows the paper's stated pairing c = 2 <-> alpha
about 0.05 with the two-sided normal quantile c = Phi^-1(1 - alpha / 2), so alpha = 2 Q(c):
c = 2 is alpha = 0.0455 exactly and alpha = 0.05 is c = 1.96. The default is c = 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

MAD_CONSISTENCY = 1.4826
DEFAULT_CUTOFF = 2.0


def cutoff_from_alpha(alpha: float) -> float:
    """Cutoff c for significance alpha: c = Phi^-1(1 - alpha / 2) (alpha = 0.0455 gives c = 2)."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return float(norm.ppf(1.0 - alpha / 2.0))


def alpha_from_cutoff(cutoff: float) -> float:
    """Significance of cutoff c: alpha = 2 Q(c) = 2 (1 - Phi(c)) (c = 2 gives 0.0455)."""
    cutoff = float(cutoff)
    if not cutoff > 0.0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    return float(2.0 * norm.sf(cutoff))


@dataclass
class DoubleMADResult:
    """Outcome of the left-tail double-MAD test."""

    median: float
    mad: float
    cutoff: float
    deviation_factors: np.ndarray = field(repr=False)
    flagged: list

    @property
    def alpha(self) -> float:
        """Significance of the cutoff: alpha = 2 Q(c)."""
        return alpha_from_cutoff(self.cutoff)


def left_deviation_factors(statistics, min_mad: float = 0.0) -> tuple[np.ndarray, float, float]:
    """Deviation factors (m - s) / max(mad, min_mad) of the left subgroup, 0 elsewhere; returns (df, m, mad).

    `min_mad` (0: none, the paper's test) floors the scale for statistics whose spread can
    collapse: when every class is about equally hard the MAD shrinks towards zero and a
    harmless difference would read as a huge deviation factor. The returned mad is unfloored.
    """
    s = np.asarray(statistics, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no statistics to test")
    if not np.isfinite(s).all():
        raise ValueError("statistics must be finite")
    m = float(np.median(s))
    left = s < m
    df = np.zeros_like(s)
    mad = MAD_CONSISTENCY * float(np.median(m - s[left])) if left.any() else 0.0
    scale = max(mad, float(min_mad))
    if scale > 0.0:
        df[left] = (m - s[left]) / scale
    return df, m, mad


def double_mad_test(statistics, cutoff: float = DEFAULT_CUTOFF, min_mad: float = 0.0) -> DoubleMADResult:
    """Flag every class whose left-tail deviation factor exceeds `cutoff` (Eq. 7)."""
    cutoff = float(cutoff)
    if not cutoff > 0.0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if not float(min_mad) >= 0.0:
        raise ValueError(f"min_mad must be >= 0, got {min_mad}")
    df, m, mad = left_deviation_factors(statistics, min_mad)
    flagged = [int(k) for k in np.flatnonzero(df > cutoff)]
    return DoubleMADResult(median=m, mad=mad, cutoff=cutoff, deviation_factors=df, flagged=flagged)
