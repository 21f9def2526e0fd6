"""Perturbation families beside STRIP's superimposition, each a deterministic function of the input.

Every family maps n inputs (n, C, H, W) to n x M transformed copies (n * M, C, H, W), copy m of
input i in row i * M + m, values kept in [0, 1]:

- ``scale``      x' = clip(a x, 0, 1) for a = 2, 3, 4, 5 (SCALE-UP, Guo et al. ICLR'23: a trigger
                 saturates under amplification and keeps its label, a natural image loses it);
- ``noise``      x' = clip(x + s z, 0, 1), z ~ N(0, 1) drawn from the input's own keyed seed, for
                 s = 0.1, 0.2, 0.3 (TeCo-style corruption, Liu et al. CVPR'23);
- ``occlusion``  a mid-grey square of a quarter of the side at the four corners and the centre
                 (a small trigger sits under one of them);
- ``shift``      the image moved by 2 px up, down, left and right, zero-filled.
"""
from __future__ import annotations

import numpy as np

from ..strip.draws import input_seeds

FAMILIES = ("scale", "noise", "occlusion", "shift")
SCALES = (2.0, 3.0, 4.0, 5.0)
SIGMAS = (0.1, 0.2, 0.3)
SHIFT = 2


def _scale(x, key):
    return np.stack([np.clip(a * x, 0.0, 1.0) for a in SCALES], axis=1)


def _noise(x, key):
    seeds = input_seeds(x, key)
    out = np.empty((len(x), len(SIGMAS)) + x.shape[1:], np.float32)
    for i, s in enumerate(seeds):
        z = np.random.default_rng(int(s)).standard_normal((len(SIGMAS),) + x.shape[1:], dtype=np.float32)
        out[i] = np.clip(x[i][None] + np.asarray(SIGMAS, np.float32)[:, None, None, None] * z, 0.0, 1.0)
    return out


def _occlusion(x, key):
    h, w = x.shape[-2:]
    s = max(1, h // 4)
    spots = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]
    out = np.repeat(x[:, None], len(spots), axis=1)
    for k, (r, c) in enumerate(spots):
        out[:, k, :, r:r + s, c:c + s] = 0.5
    return out


def _shift(x, key):
    out = np.zeros((len(x), 4) + x.shape[1:], np.float32)
    d = SHIFT
    out[:, 0, :, :-d, :] = x[:, :, d:, :]
    out[:, 1, :, d:, :] = x[:, :, :-d, :]
    out[:, 2, :, :, :-d] = x[:, :, :, d:]
    out[:, 3, :, :, d:] = x[:, :, :, :-d]
    return out


_BUILD = {"scale": _scale, "noise": _noise, "occlusion": _occlusion, "shift": _shift}


def family_copies(name: str, x: np.ndarray, key: bytes) -> np.ndarray:
    """(n, M, C, H, W) float32 copies of x under family `name` (see the module doc)."""
    if name not in _BUILD:
        raise ValueError(f"unknown perturbation family {name!r}; choose from {FAMILIES}")
    return _BUILD[name](np.asarray(x, np.float32), key).astype(np.float32, copy=False)
