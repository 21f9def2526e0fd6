"""Reachable per-class margins through the oracle (MM-BD's statistic, Wang et al. S&P'24, black-box).

For class k of a model with class probabilities p(x), the reachable margin is

    r_k = max_{x in [0, 1]^d} [ log p_k(x) - max_{j != k} log p_j(x) ],

the logit margin a softmax model can be driven to for k. A backdoor target has a shortcut feature, so its
reachable margin stands out. MM-BD ascends the gradient; the oracle gives probabilities only, so here the
ascent is NES (Wierstra et al.): x = sigmoid(w), w of shape (C, R, R) upsampled (nearest) to the input's
(C, H, W), R = min(resolution, H, W); with P antithetic Gaussian directions u_i,

    g = 1 / (2 P sigma) sum_i [ f(w + sigma u_i) - f(w - sigma u_i) ] u_i,

and an Adam step of size `lr` along g. The best margin seen is kept, and r_k is averaged over `restarts`
random starts, so a single unlucky start does not move it. One model costs
K * restarts * steps * (2 P + 1) queries, sent in one batch per step.

Within one model the classes are no null (bag reaches the largest margin on most benign Fashion-MNIST
models), so r is compared class by class with benign shadows of the task. Each model is first put on its
own scale, rho_k = r_k / max(median_j r_j, 0.1); the benign shadows give a per-class mean mu_k and
standard deviation s_k, and

    z_k = (rho_k - mu_k) / s_k

is how far class k's reachable margin is above benign models of the task (see `calibration`).
"""
from __future__ import annotations

import numpy as np


def _upsample(w: np.ndarray, h: int, width: int) -> np.ndarray:
    """(..., C, R, R) -> (..., C, h, width), nearest neighbour."""
    r = w.shape[-1]
    rows = (np.arange(h) * r) // h
    cols = (np.arange(width) * r) // width
    return w[..., rows[:, None], cols[None, :]]


def margins(log_p: np.ndarray) -> np.ndarray:
    """(n, K) log-probabilities -> (n, K) margins log p_k - max_{j != k} log p_j."""
    top2 = np.sort(log_p, axis=1)[:, -2:]
    other = np.where(log_p >= top2[:, 1:2], top2[:, 0:1], top2[:, 1:2])
    return log_p - other


def relative(r: np.ndarray) -> np.ndarray:
    """rho = r / max(median(r), 0.1) along the last axis: a model's margins on its own scale."""
    r = np.asarray(r, np.float64)
    return r / np.maximum(np.median(r, axis=-1, keepdims=True), 0.1)


class ReachableMargins:
    """NES search of every class's reachable margin (see the module's equations).

    Parameters
    ----------
    steps : int
        NES steps per search.
    pairs : int
        P, antithetic direction pairs per step.
    restarts : int
        Random starts per class; r_k is their mean.
    resolution : int
        R, the side of the searched grid (capped at the input's side).
    sigma, lr : float
        NES smoothing radius in w and Adam's step size.
    seed : int
        Seed of the starts and directions: the same model always gets the same margins.
    batch_size : int
        Largest batch sent to the model at once.
    """

    def __init__(self, steps: int = 150, pairs: int = 16, restarts: int = 3, resolution: int = 14,
                 sigma: float = 0.5, lr: float = 0.15, seed: int = 0, batch_size: int = 4096):
        self.steps = steps
        self.pairs = pairs
        self.restarts = restarts
        self.resolution = resolution
        self.sigma = sigma
        self.lr = lr
        self.seed = seed
        self.batch_size = batch_size

    def queries(self, n_classes: int) -> int:
        """Queries one model costs: K * restarts * steps * (2 P + 1)."""
        return n_classes * self.restarts * self.steps * (2 * self.pairs + 1)

    def measure(self, predict_proba, in_shape, n_classes: int) -> np.ndarray:
        """r (K,) for a model answering `predict_proba(x (n, C, H, W) float32) -> (n, K)`."""
        if min(self.steps, self.pairs, self.restarts, self.resolution) < 1:
            raise ValueError("steps, pairs, restarts and resolution must be at least 1")
        c, h, w_ = (int(v) for v in in_shape)
        res = min(self.resolution, h, w_)
        rng = np.random.default_rng([self.seed, 4243])
        n = n_classes * self.restarts
        cls = np.repeat(np.arange(n_classes), self.restarts)
        w = rng.normal(0.0, 1.0, (n, c, res, res))
        m1, m2 = np.zeros_like(w), np.zeros_like(w)
        best = np.full(n, -np.inf)
        p2 = 2 * self.pairs + 1
        for step in range(1, self.steps + 1):
            u = rng.normal(0.0, 1.0, (n, self.pairs, c, res, res))
            wp = np.concatenate([w[:, None] + self.sigma * u, w[:, None] - self.sigma * u, w[:, None]], axis=1)
            x = (1.0 / (1.0 + np.exp(-_upsample(wp, h, w_)))).astype(np.float32).reshape(-1, c, h, w_)
            p = np.concatenate([np.asarray(predict_proba(x[i:i + self.batch_size]), np.float64)
                                for i in range(0, len(x), self.batch_size)])
            f = margins(np.log(np.clip(p, 1e-45, 1.0))).reshape(n, p2, n_classes)[np.arange(n), :, cls]
            best = np.maximum(best, f.max(axis=1))
            g = ((f[:, :self.pairs] - f[:, self.pairs:2 * self.pairs])[:, :, None, None, None] * u).mean(axis=1)
            g /= 2 * self.sigma
            m1 = 0.9 * m1 + 0.1 * g
            m2 = 0.999 * m2 + 0.001 * g * g
            w = w + self.lr * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-8)
        return best.reshape(n_classes, self.restarts).mean(axis=1)


def torch_predict(model):
    """`predict_proba` for a torch shadow model (softmax of its logits, no gradients)."""
    import torch

    model = model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))), 1).double().numpy()

    return predict


def cached_margins(cache_dir, shadow_key: str, probe: ReachableMargins, model, in_shape, n_classes: int) -> np.ndarray:
    """A shadow's r (K,), read from ``<cache_dir>/margins/<key>.json`` or measured and written there (atomic
    rename), key = sha256 of the shadow's key and the probe's settings; a stopped calibration resumes."""
    import json
    from pathlib import Path

    from ..hashing import sha256_bytes

    settings = {k: getattr(probe, k) for k in ("steps", "pairs", "restarts", "resolution", "sigma", "lr", "seed")}
    key = sha256_bytes(json.dumps({"shadow": shadow_key, "probe": settings}, sort_keys=True).encode())[:24]
    path = Path(cache_dir) / "margins" / f"{key}.json"
    if path.exists():
        r = np.asarray(json.loads(path.read_text())["r"], np.float64)
        if r.shape == (n_classes,) and np.isfinite(r).all():
            return r
    r = probe.measure(torch_predict(model), in_shape, n_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"r": [float(v) for v in r], "shadow": shadow_key, "probe": settings}))
    part.replace(path)
    return r
