"""Per-class trigger perturbation statistic, measured on the oracle alone (DeepInspect Sec. 3.3).

For class t every inverted image x_i of another class gets its own trigger Delta_i = G(z_i, t)
and the stamped input is clip(x_i + s * M * Delta_i, 0, 1). The statistic is the smallest
perturbation level

    stat[t] = min over supports M, scales s of  s * mean_i ||M * Delta_i||_1
              subject to  share_i(success(D(x_i'), t, y_i)) >= success_target,

searched on the oracle: for each support M of a ladder (the k pixels where the mean |Delta|
is largest, k = 4, 8, ..., and the full image) the smallest scale s in (0, max_scale] is found
by bisection. The search stays black-box: only the oracle's answers decide success.

A stamped input counts as moved to t when the oracle's label is t (the paper's criterion).

Why the support ladder: a generator trained with estimated gradients spreads small,
useless values over the whole image (the noise of the estimate, held near zero by the L1
hinge but never exactly zero). A real trojan trigger is concentrated (a patch, a sparse
pattern) and keeps working when the spread is cut away; the natural direction to an easy
benign class is not and does not. Pruning therefore shrinks the trojan class's statistic to
close to the true trigger's size while leaving benign classes almost where they were. A
class whose triggers never reach the target keeps max_scale * ||Delta||_1 (an upper end,
never a left-tail outlier).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .defaults import SUCCESS_TARGET

DEFAULT_LADDER = (4, 8, 16, 32, 64, 128, 256)


def draw_seed(seed: int, t: int) -> int:
    """The seed of class t's trigger draws at scan seed `seed`: the statistic and the co-target links
    draw the same triggers for a class."""
    return int(seed) * 1000 + int(t)


def support_ladder(n_pixels: int, ladder=DEFAULT_LADDER) -> list[int]:
    """Support sizes below the input size, ascending, then the full input (`n_pixels`)."""
    sizes = sorted({int(k) for k in ladder if 0 < int(k) < n_pixels})
    return sizes + [int(n_pixels)]


def statistics_cost(n_classes: int, n_sources: int, bisection_steps: int, n_supports: int) -> int:
    """Upper bound on the queries of `trigger_statistics`: (2 + bisection_steps) passes per support and class."""
    return int(n_classes * n_supports * (bisection_steps + 2) * n_sources)


@dataclass
class TriggerStatistics:
    """Per class: the statistic, the support size and scale that achieved it, the success of
    G's raw output at scale 1, whether the target was reached, and the full-support statistic."""

    statistics: np.ndarray
    supports: np.ndarray
    scales: np.ndarray
    success_at_1: np.ndarray
    reached: np.ndarray
    dense: np.ndarray
    masks: np.ndarray  # (K, C, H, W) float32 0/1: the winning support of each class


def _smallest_scale(success, success_target: float, max_scale: float, steps: int):
    """Bisection for the smallest s in (0, max_scale] with success(s) >= target; None if max_scale fails."""
    if success(max_scale) < success_target:
        return None
    lo, hi = 0.0, max_scale
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if success(mid) >= success_target:
            hi = mid
        else:
            lo = mid
    return hi


def trigger_statistics(oracle, generator, x: np.ndarray, y: np.ndarray, success_target: float = SUCCESS_TARGET,
                       max_scale: float = 4.0, bisection_steps: int = 10, ladder=DEFAULT_LADDER,
                       seed: int = 0, progress: bool = True) -> TriggerStatistics:
    """Measure every class's statistic on the oracle (see the module doc)."""
    k = generator.n_classes
    shape = tuple(generator.input_shape)
    n_pix = int(np.prod(shape))
    sizes = support_ladder(n_pix, ladder)
    x = np.asarray(x, np.float32)
    stats, supports, scales, success1, reached, dense, masks = [], [], [], [], [], [], []
    for t in tqdm(range(k), desc="statistics", disable=not progress, leave=False):
        src = x[y != t]
        delta = generator.sample(t, len(src), seed=draw_seed(seed, t))
        flat = np.abs(delta).reshape(len(delta), -1)
        order = np.argsort(-flat.mean(0), kind="stable")

        def success(d):
            return lambda s: float((oracle.predict_proba(np.clip(src + s * d, 0.0, 1.0)).argmax(1) == t).mean())

        success1.append(success(delta)(1.0))
        l1_full = float(flat.sum(1).mean())
        best = None
        for size in sizes:
            kept = order[:size]
            mask = np.zeros(n_pix, np.float32)
            mask[kept] = 1.0
            mask = mask.reshape(shape)
            s = _smallest_scale(success(delta * mask), success_target, max_scale, bisection_steps)
            if size == n_pix:
                dense.append((max_scale if s is None else s) * l1_full)
            if s is None:
                continue
            level = s * float(flat[:, kept].sum(1).mean())
            if best is None or level < best[0]:
                best = (level, size, s, mask)
        reached.append(best is not None)
        if best is None:
            best = (max_scale * l1_full, n_pix, max_scale, np.ones(shape, np.float32))
        stats.append(best[0])
        supports.append(best[1])
        scales.append(best[2])
        masks.append(best[3])
    return TriggerStatistics(statistics=np.asarray(stats), supports=np.asarray(supports),
                             scales=np.asarray(scales), success_at_1=np.asarray(success1),
                             reached=np.asarray(reached, bool), dense=np.asarray(dense),
                             masks=np.stack(masks).astype(np.float32))
