"""Stamping the fine-tuning images: flagged-class triggers, background triggers and jitter."""
from __future__ import annotations

import numpy as np

from ..errors import InputShapeError
from .measure import Stamp


def draw_targets(y: np.ndarray, flagged: np.ndarray, rng) -> np.ndarray:
    """A flagged target per image, different from its true class whenever possible."""
    t = rng.choice(flagged, size=len(y))
    if len(flagged) > 1:
        same = t == y
        while same.any():
            t[same] = rng.choice(flagged, size=int(same.sum()))
            same = t == y
    return t


def stamp_by_target(stamp: Stamp, x: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
    """x with each image stamped with the trigger of its target t[i] (seed + t[i] per class); shape checked."""
    out = np.empty_like(x)
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        stamped = np.asarray(stamp(x[idx], int(c), int(seed) + int(c)), dtype=np.float32)
        if stamped.shape != x[idx].shape:
            raise InputShapeError(f"stamp returned shape {stamped.shape} for inputs of shape {x[idx].shape}")
        out[idx] = stamped
    return out


def stamped_share(x: np.ndarray, y: np.ndarray, n: int, classes: np.ndarray, stamp: Stamp, jitter: int,
                   rng) -> tuple[np.ndarray, np.ndarray]:
    """n images drawn from (x, y), each stamped with a trigger for one of `classes` (not its own
    class where possible) and jittered; returned with their true labels."""
    idx = rng.choice(len(x), size=n, replace=False)
    t = draw_targets(y[idx], classes, rng)
    stamped = stamp_by_target(stamp, x[idx], t, seed=int(rng.integers(2**31)))
    return jitter_stamps(x[idx], stamped, jitter, rng), y[idx]


def shift_image(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a (C, H, W) moved by dy rows and dx columns, zero-filled (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def jitter_stamps(x: np.ndarray, stamped: np.ndarray, max_shift: int, rng) -> np.ndarray:
    """Move each stamped image's effective trigger clip(x + Delta) - x by a random (dy, dx) in
    [-max_shift, max_shift]^2 and stamp it again: clip(x + shift(stamped - x), 0, 1)."""
    if max_shift <= 0:
        return stamped
    delta = stamped - x
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))
    out = np.stack([shift_image(d, int(dy), int(dx)) for d, (dy, dx) in zip(delta, shifts)]) if len(x) else delta
    return np.clip(x + out, 0.0, 1.0).astype(np.float32)
