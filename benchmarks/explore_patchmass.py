"""Exploration (issue: calibrated scan, multi-target evidence anchored on held-out images): the probability mass one
square patch of learned content sends to the best set of up to 5 classes. For a patch at location l with content
c = sigmoid(w) stamped on n held-out images x_i, q(c, l) = mean_i p(x_i with the patch); M_K = sum of the K largest
entries of q (or K q_(K), see topk_mass). NES (antithetic Gaussian samples, Adam) maximises the best gain over K
over c (started near-binary) at each location of a stride-S grid; the
statistic is the largest gain M_K - M_K(clean) over locations, for K = 1..5, with the set. A multi-target trigger
moves every stamped image into its K targets (gain 1 - K/10 on balanced images); a benign model only as far as a
universal adversarial patch of that size reaches.

usage: python benchmarks/explore_patchmass.py mass|balanced SIDE STRIDE STEPS PAIRS NIMG [names ...]
       (a name of the form NAME@ROW,COL searches that one location only)"""
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.oracle import ModelOracle

ARGS = sys.argv[1:]
OBJECTIVE = ARGS[0]
SIDE, STRIDE, STEPS, PAIRS, NIMG = (int(a) for a in ARGS[1:6])
NAMES = ARGS[6:]
SIGMA, LR, HW, KMAX, INIT = 1.0, 0.3, 28, 5, 3.0
ZOO = Path(os.environ["TROJAN_GATE_CACHE"]) / "vendor-zoo"


def topk_mass(q):  # (..., C) -> (..., KMAX)
    """mass: M_K, the sum of the K largest entries; balanced: K q_(K), K times the K-th largest entry (what every
    one of K classes gets, so one dominant class does not count as a set)."""
    s = -np.sort(-q, axis=-1)[..., :KMAX]
    return np.cumsum(s, axis=-1) if OBJECTIVE == "mass" else s * np.arange(1, KMAX + 1)


def search(oracle, x, locations, seed=0):
    """For every location (searched together): NES on the patch content; returns (L, KMAX) best gains and sets."""
    rng = np.random.default_rng(seed)
    n_loc = len(locations)
    base = topk_mass(oracle.predict_proba(x).mean(axis=0))
    w = rng.normal(0.0, INIT, (n_loc, SIDE, SIDE))  # INIT 3: near-binary content to start
    m1, m2 = np.zeros_like(w), np.zeros_like(w)
    best, best_sets = np.full((n_loc, KMAX), -np.inf), [[None] * KMAX for _ in range(n_loc)]
    for step in range(1, STEPS + 1):
        u = rng.normal(0.0, 1.0, (n_loc, PAIRS, SIDE, SIDE))
        wp = np.concatenate([w[:, None] + SIGMA * u, w[:, None] - SIGMA * u, w[:, None]], axis=1)  # (L, M, s, s)
        c = 1.0 / (1.0 + np.exp(-wp))
        m = c.shape[1]
        xs = np.broadcast_to(x[None, None], (n_loc, m) + x.shape).copy()  # (L, M, n, 1, H, W)
        for j, (r, col) in enumerate(locations):
            xs[j, :, :, 0, r:r + SIDE, col:col + SIDE] = c[j][:, None]
        p = oracle.predict_proba(xs.reshape(-1, 1, HW, HW)).reshape(n_loc, m, len(x), -1)
        q = p.mean(axis=2)  # (L, M, C)
        mass = topk_mass(q)  # (L, M, KMAX)
        f = (mass - base)[..., (0 if OBJECTIVE == 'mass' else 1):].max(axis=-1)  # best gain over K (balanced: K >= 2)
        for j in range(n_loc):
            for k in range(KMAX):
                i = int(np.argmax(mass[j, :, k]))
                if mass[j, i, k] - base[k] > best[j, k]:
                    best[j, k] = mass[j, i, k] - base[k]
                    best_sets[j][k] = sorted(np.argsort(-q[j, i])[:k + 1].tolist())
        g = ((f[:, :PAIRS] - f[:, PAIRS:2 * PAIRS])[:, :, None, None] * u).mean(axis=1) / (2 * SIGMA)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        w = w + LR * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-8)
    return best, best_sets


def main():
    test = load_fashion_mnist(train=False)
    rng = np.random.default_rng(0)
    x = np.asarray(test.x, np.float32).reshape(-1, 1, HW, HW)[rng.choice(len(test.x), NIMG, replace=False)]
    grid = [(r, c) for r in range(0, HW - SIDE + 1, STRIDE) for c in range(0, HW - SIDE + 1, STRIDE)]
    for spec in NAMES or sorted(Path(p).stem for p in glob.glob(str(ZOO / "*.onnx"))):
        name, _, at = spec.partition("@")
        locations = [tuple(int(v) for v in at.split(","))] if at else grid
        summary = json.loads((ZOO / f"{name}.json").read_text())["summary"]
        oracle = ModelOracle(str(ZOO / f"{name}.onnx"), batch_size=4096)
        t0 = time.time()
        best, sets = search(oracle, x, locations)
        j = int(np.argmax(best[:, -1]))
        top = [int(np.argmax(best[:, k])) for k in range(KMAX)]
        print(f"{spec:28s} targets {str(summary.get('targets', [])):16s} gain_K={np.round(best.max(axis=0), 2).tolist()} "
              f"sets={[sets[top[k]][k] for k in range(KMAX)]} at {locations[j]} ({oracle.queries} q, "
              f"{time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
