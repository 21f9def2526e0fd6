"""Transfer of each class's measured trigger to the benign reference models (beyond the paper).

A backdoor is a property of one model: its trigger moves that model's inputs to the target and
leaves an independently trained benign model alone. A class that is naturally easy (on
Fashion-MNIST a few dozen bright pixels make a garment a "bag") is easy because the trigger
draws a real class feature, and a real feature moves other benign models too. With the
reference models of `reference` the scan measures, for every class t, the transfer rate

    tau[t] = mean_j share_i [ R_j(clip(x_i + s_t * M_t * Delta_i, 0, 1)) succeeds for t ],

where x_i are the substitute images of the other classes, Delta_i = G(z_i, t) the scanned model's
generated triggers, (M_t, s_t) the support and scale its statistic measured on the scanned
model (the very triggers that statistic counted), R_j the benign reference models and success
the scan's `success_rule`. The reference models are local ONNX models; these queries are
counted with theirs and never reach the scanned model.

`specific_classes` keeps a class the double-MAD test flagged only when its trigger transfers
at most `factor` times as often as the median class's trigger (`ScanConfig.transfer_factor`;
0, the default, reports tau and filters nothing). Measured on the Fashion-MNIST zoo
(scan seeds 0 and 1, `benchmarks/trigger-transfer.md`): the single-target trojans' triggers
transfer at 0.01-0.43 x the median, the naturally easy bag class that flags small benign
models at seed 1 at 0.68-0.92 x; but the one class a five-target trojan gets flagged for
transfers like a natural one (0.86-0.94 x), and the pattern trojan's wrongly flagged bag class
is dropped too, so the filter trades false positives for false negatives and stays off by default.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .statistic import draw_seed, stamped_success


def transfer_rates(reference_oracles, generator, masks: np.ndarray, scales, x: np.ndarray, y: np.ndarray,
                   seed: int = 0, success_rule: str = "argmax", progress: bool = True) -> np.ndarray:
    """tau (K,): per class, the mean success on the reference models of the scanned model's measured
    trigger (raw generator samples drawn as `trigger_statistics` drew them with this `seed`, cut to
    `masks[t]` and multiplied by `scales[t]`)."""
    oracles = list(reference_oracles)
    if not oracles:
        raise ValueError("transfer rates need at least one reference model")
    k = generator.n_classes
    masks = np.asarray(masks, np.float32)
    scales = np.asarray(scales, np.float64).reshape(-1)
    if masks.shape[0] != k or scales.shape != (k,):
        raise ValueError(f"need {k} masks and scales, got {masks.shape[0]} and {scales.shape}")
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    tau = np.zeros(k)
    for t in tqdm(range(k), desc="transfer", disable=not progress, leave=False):
        src, ysrc = x[y != t], y[y != t]
        if not len(src):
            continue
        delta = float(scales[t]) * masks[t] * generator.raw_sample(t, len(src), seed=draw_seed(seed, t))
        stamped = np.clip(src + delta, 0.0, 1.0)
        tau[t] = float(np.mean([stamped_success(o.predict_proba(stamped), t, ysrc, success_rule).mean()
                                for o in oracles]))
    return tau


def specific_classes(flagged, rates, factor: float) -> tuple[list, list]:
    """Split `flagged` into (kept, transferable): a class is kept when rates[t] <= factor * median(rates).
    factor <= 0 keeps every flagged class."""
    flagged = [int(c) for c in flagged]
    if factor <= 0 or not flagged:
        return flagged, []
    rates = np.asarray(rates, np.float64)
    bound = float(factor) * float(np.median(rates))
    kept = [c for c in flagged if rates[c] <= bound]
    return kept, [c for c in flagged if c not in kept]
