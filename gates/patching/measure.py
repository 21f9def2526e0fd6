"""Before/after figures of a patch, measured through ONNX Runtime (never the torch module).

The trojan activation rate of target t is the share of stamped images of other classes that
the model labels t; clean accuracy is read on held-out images the patch did not train on, and
the accuracy drop carries its paired standard error (McNemar's pairing of the same images).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..oracle import ModelOracle

Stamp = Callable[[np.ndarray, int, int], np.ndarray]


def trojan_activation_rates(predict, x: np.ndarray, y: np.ndarray, stamp: Stamp, targets,
                            seed: int = 0) -> dict:
    """Per target t: share of stamped images with true class != t that are predicted as t."""
    rates = {}
    for t in targets:
        keep = y != t
        if not keep.any():
            rates[int(t)] = float("nan")
            continue
        xs = np.asarray(stamp(x[keep], int(t), int(seed) + int(t)), dtype=np.float32)
        rates[int(t)] = float((predict(xs) == t).mean())
    return rates


def _pooled_rate(rates: dict, y: np.ndarray) -> float:
    """Activation rate pooled over targets (each weighted by its number of stamped images)."""
    num = den = 0.0
    for t, r in rates.items():
        n = int((y != t).sum())
        if n and np.isfinite(r):
            num += r * n
            den += n
    return float(num / den) if den else float("nan")


def measure(onnx_bytes: bytes, x_eval, y_eval, stamp: Stamp, targets, seed: int,
            x_clean=None, y_clean=None, phase: str = "patch-eval", return_correct: bool = False):
    """Clean accuracy and trojan activation rate of an ONNX model, queried through ModelOracle.
    With `return_correct` also the per-image correctness on the clean images (None without them)."""
    oracle = ModelOracle(onnx_bytes)
    with oracle.phase(phase):
        predict = oracle.predict
        rates = trojan_activation_rates(predict, x_eval, y_eval, stamp, targets, seed)
        acc = correct = None
        if x_clean is not None and len(x_clean):
            correct = predict(x_clean) == np.asarray(y_clean)
            acc = float(correct.mean())
    out = {"clean_accuracy": acc, "trojan_activation_rate": _pooled_rate(rates, y_eval),
           "trojan_activation_rates": rates, "queries": int(oracle.queries)}
    return (out, correct) if return_correct else out


def paired_drop_standard_error(correct_before, correct_after) -> float | None:
    """Standard error of the accuracy drop acc_before - acc_after measured on the same n images.

    With d_i = correct_before_i - correct_after_i in {-1, 0, 1}, b images right only before and
    c right only after: Var(d) = (b + c)/n - ((b - c)/n)^2 and SE = sqrt(Var(d) / n). Only the
    images on which the two models disagree carry noise (McNemar's pairing); None without data.
    """
    if correct_before is None or correct_after is None:
        return None
    cb, ca = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    if cb.shape != ca.shape or not cb.size:
        return None
    n = cb.size
    b, c = float((cb & ~ca).sum()), float((ca & ~cb).sum())
    return float(np.sqrt(max((b + c) / n - ((b - c) / n) ** 2, 0.0) / n))
