"""Query-only gradient estimation: antithetic NES, batched over many points at once.

For a batch of points v (B, *shape) and a scalar loss per point that can only be evaluated
through a black box, the estimators send every probe of every point in ONE call of
`forward`: the B centres followed by B x n antithetic pairs v +/- sigma u. With per-point
losses L(v), the estimate is

    g(v) = 1 / (2 sigma n) * sum_i (L(v + sigma u_i) - L(v - sigma u_i)) u_i

(Ilyas et al. 2018, NES with antithetic sampling and Gaussian directions u_i). Noise may be drawn on a coarser grid
(`tile`) and repeated up to the full resolution: the estimate then lives in the span of
piecewise-constant directions, which cuts its variance on images at the price of detail.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def tile_indices(size: int, tile: int) -> np.ndarray:
    """Index map from a full axis of `size` to its coarse grid of ceil(size / tile) cells."""
    return np.arange(size) // max(1, int(tile))


@dataclass
class GradientEstimate:
    """What one estimator call learned: the gradient, and the centres' outputs and losses."""

    grad: np.ndarray  # (B, *shape) float64
    outputs: np.ndarray  # (B, K) forward outputs at the centres
    loss: np.ndarray  # (B,) losses at the centres
    queries: int  # inputs sent to forward


class NESEstimator:
    """Antithetic NES gradient estimator over random Gaussian directions (Ilyas et al. 2018).

    Parameters
    ----------
    n_pairs : antithetic pairs per point (2 * n_pairs + 1 queries per point and call)
    sigma : probe radius
    tile : draw noise on a grid coarser by this factor along the last two axes (1 = full)
    seed : seed of the direction generator
    """

    def __init__(self, n_pairs: int = 10, sigma: float = 0.05, tile: int = 1, seed: int = 0):
        if n_pairs < 1 or sigma <= 0:
            raise ValueError("n_pairs must be >= 1 and sigma > 0")
        self.n_pairs = int(n_pairs)
        self.sigma = float(sigma)
        self.tile = int(tile)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def queries_per_point(self) -> int:
        """Queries per point and call: 2 * n_pairs + 1 (the centre and the antithetic pairs)."""
        return 2 * self.n_pairs + 1

    def directions(self, batch: int, shape: tuple) -> np.ndarray:
        """Random directions (batch, n_pairs, *shape), coarse-grained when tile > 1."""
        shape = tuple(shape)
        if self.tile > 1 and len(shape) >= 2:
            ri, ci = tile_indices(shape[-2], self.tile), tile_indices(shape[-1], self.tile)
            coarse = shape[:-2] + (int(ri[-1]) + 1, int(ci[-1]) + 1)
        else:
            coarse = shape
        u = self._rng.standard_normal((batch, self.n_pairs) + coarse, dtype=np.float32)
        if coarse != shape:
            u = u[..., ri, :][..., ci]
        return u

    def estimate(self, forward, loss, v) -> GradientEstimate:
        """Estimate d loss / d v at every point of v with one call of `forward`.

        forward : (N, *shape) float32 -> (N, K) outputs (e.g. the oracle's probabilities)
        loss : outputs (B, R, K) -> (B, R) per-probe losses; probe 0 of each point is its centre
        v : (B, *shape) points
        """
        v = np.asarray(v, dtype=np.float32)
        b, shape = v.shape[0], v.shape[1:]
        u = self.directions(b, shape)
        probes = np.concatenate([v[:, None], v[:, None] + self.sigma * u, v[:, None] - self.sigma * u], axis=1)
        r = probes.shape[1]
        out = np.asarray(forward(probes.reshape((b * r,) + shape)))
        out = out.reshape((b, r) + out.shape[1:])
        losses = np.asarray(loss(out), dtype=np.float64)
        if losses.shape != (b, r):
            raise ValueError(f"loss must return shape {(b, r)}, got {losses.shape}")
        n = self.n_pairs
        diff = losses[:, 1:1 + n] - losses[:, 1 + n:]  # (B, n)
        grad = np.einsum("bn,bn...->b...", diff, u.astype(np.float64)) / (2.0 * self.sigma * n)
        return GradientEstimate(grad=grad, outputs=out[:, 0], loss=losses[:, 0], queries=b * r)
