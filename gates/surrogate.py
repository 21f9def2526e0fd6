"""Surrogate-assisted generator training: Eq. 6 with gradients from a distilled local model.

Per-step query estimates cost (2 n + 1) queries per stamped image and step. Instead, a small
local CNN S is distilled from the oracle's answers (soft labels, cross-entropy) and G is
trained through S with exact gradients; S is used *only* for gradients:

- S starts from the oracle's answers on the substitute set and noisy copies of it;
- every `refresh_every` steps the oracle labels the inputs G currently proposes,
  x' = clip(x + G(z, t), 0, 1), plus `refresh_probes` noisy copies of each, and S is
  fine-tuned on them, so that it learns the region G explores (a trojan's trigger region);
- the gamma2 thermostat uses the oracle's answers at those refreshes, never S's;
- every statistic and success rate of the scan is re-measured on the oracle afterwards.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .estimators import NESEstimator
from .generator import GeneratorTrainer


class SurrogateNet(nn.Module):
    """A small CNN for any (C, H, W): two conv blocks, adaptive pooling, two dense layers."""

    def __init__(self, input_shape, n_classes: int, width: int = 32):
        super().__init__()
        c, h, _ = input_shape
        pool = [nn.MaxPool2d(2)] if h >= 16 else []
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), *pool,
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, n_classes),
        )

    def forward(self, x):
        return self.net(x)


class SurrogateGeneratorTrainer(GeneratorTrainer):
    """GeneratorTrainer whose Delta-gradients come from a surrogate refreshed with oracle answers.

    Extra parameters
    ----------------
    refresh_every : steps between oracle refreshes of the surrogate
    refresh_probes : noisy copies per proposed input at a refresh (probe radius `sigma`)
    initial_copies : noisy copies of each substitute image in the initial transfer set
    distill_steps, finetune_steps : surrogate updates at start and per refresh
    surrogate_lr, distill_batch, buffer_size : surrogate optimiser, batch and memory
    """

    def __init__(self, refresh_every: int = 5, refresh_probes: int = 4, initial_copies: int = 8,
                 distill_steps: int = 400, finetune_steps: int = 10, surrogate_lr: float = 1e-3,
                 distill_batch: int = 128, buffer_size: int = 30000, sigma: float = 0.1, tile: int = 1, **kwargs):
        kwargs.pop("estimator", None)
        kwargs.pop("n_pairs", None)
        super().__init__(sigma=sigma, tile=tile, **kwargs)
        self.refresh_every = refresh_every
        self.refresh_probes = refresh_probes
        self.initial_copies = initial_copies
        self.distill_steps = distill_steps
        self.finetune_steps = finetune_steps
        self.surrogate_lr = surrogate_lr
        self.distill_batch = distill_batch
        self.buffer_size = buffer_size

    def queries_per_step(self, n_classes: int) -> int:
        """Upper bound for one step: a refresh labels every proposal and its noisy copies."""
        return n_classes * self.batch_per_class * (1 + self.refresh_probes)

    def _noisy(self, x: np.ndarray, copies: int) -> np.ndarray:
        u = self._noise.directions(len(x), x.shape[1:])[:, :copies]  # (B, copies, ...)
        scale = self.sigma * self._rng.random((len(x), copies) + (1,) * (x.ndim - 1)).astype(np.float32)
        return np.clip(x[:, None] + scale * u, 0.0, 1.0).reshape((-1,) + x.shape[1:])

    def _add(self, oracle, xq: np.ndarray) -> np.ndarray:
        p = oracle.predict_proba(xq).astype(np.float32)
        self._bx.append(torch.from_numpy(xq).to(self._device))
        self._bp.append(torch.from_numpy(p).to(self._device))
        while sum(len(b) for b in self._bx[1:]) > self.buffer_size and len(self._bx) > 2:
            del self._bx[1], self._bp[1]  # the initial transfer set stays, the oldest refresh goes
        return p

    def _train_surrogate(self, steps: int, recent: int = 0):
        bx, bp = torch.cat(self._bx), torch.cat(self._bp)
        self._S.train()
        for _ in range(steps):
            idx = torch.from_numpy(self._rng.integers(0, len(bx), self.distill_batch)).to(self._device)
            if recent:  # half of each batch from the latest refresh
                idx[: self.distill_batch // 2] = len(bx) - 1 - torch.from_numpy(
                    self._rng.integers(0, recent, self.distill_batch // 2)).to(self._device)
            logp = torch.log_softmax(self._S(bx[idx]), dim=1)
            loss = -(bp[idx] * logp).sum(1).mean()
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
        self._S.eval()

    def _setup(self, oracle, x, y, rng, device):
        self._rng = rng
        self._device = device
        self._noise = NESEstimator(n_pairs=max(self.initial_copies, self.refresh_probes, 1), sigma=self.sigma,
                                   tile=self.tile, seed=int(rng.integers(2**31)))
        self._S = SurrogateNet(oracle.input_shape, oracle.n_classes).to(device)
        self._opt = torch.optim.Adam(self._S.parameters(), lr=self.surrogate_lr)
        self._bx, self._bp = [], []
        self._add(oracle, np.concatenate([x, self._noisy(x, self.initial_copies)]))
        self._train_surrogate(self.distill_steps)

    def _delta_grad(self, oracle, xs, tgt, delta: np.ndarray, step: int):
        outputs = None
        if step % self.refresh_every == 0:
            xq = np.clip(xs + delta, 0.0, 1.0).astype(np.float32)
            probes = np.concatenate([xq, self._noisy(xq, self.refresh_probes)]) if self.refresh_probes else xq
            outputs = self._add(oracle, probes)[: len(xq)]
            self._train_surrogate(self.finetune_steps, recent=len(probes))
        d = torch.from_numpy(delta).to(self._device).requires_grad_(True)
        xp = torch.clamp(torch.from_numpy(xs).to(self._device) + d, 0.0, 1.0)
        logp = torch.log_softmax(self._S(xp), dim=1)
        t = torch.from_numpy(tgt).to(self._device)
        lt = logp[torch.arange(len(t)), t]
        loss = (-lt + self.gamma1 * (lt.exp() - 1.0) ** 2).sum()
        loss.backward()
        return d.grad.detach().cpu().numpy().astype(np.float64), outputs
