"""Exploration (issue: calibrated scan, evidence): a black-box maximum-margin statistic in the MM-BD habit
(Wang et al., S&P'24). Per class k, r_k = max_x [log p_k(x) - max_{j != k} log p_j(x)] over inputs x in [0, 1],
which is logit_k - max_j logit_j for a softmax model (until float32 underflow). MM-BD ascends the gradient; here
the oracle gives probabilities only, so the ascent uses NES (antithetic Gaussian samples, Adam) on
x = sigmoid(w), w at a coarse resolution upsampled to the input's. r_k is averaged over R random restarts.
A backdoor target has a shortcut feature, so its reachable margin stands out among the model's own classes:
anomaly = (max_k r_k - median_{others}) / MAD_{others}. Measured on the test zoo only (no shadow cache here).

usage: python benchmarks/explore_mmbd.py STEPS PAIRS RESTARTS RES [names ...]"""
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np

from trojan_gate.gates.oracle import ModelOracle

STEPS, PAIRS, RESTARTS, RES = (int(a) for a in sys.argv[1:5])
NAMES = sys.argv[5:]
SIGMA, LR, K, HW = 0.5, 0.15, 10, 28
CACHE = Path("/tmp/mmbd") if not Path("cache").exists() else Path("cache/mmbd")
CACHE.mkdir(parents=True, exist_ok=True)


def upsample(w):  # (..., RES, RES) -> (..., 28, 28), nearest
    idx = (np.arange(HW) * RES) // HW
    return w[..., idx[:, None], idx[None, :]]


def margins(logp):  # (n, K) -> (n, K): log p_k - max_{j != k} log p_j
    top2 = np.sort(logp, axis=1)[:, -2:]
    other = np.where(logp >= top2[:, 1:2], top2[:, 0:1], top2[:, 1:2])
    return logp - other


def statistic(oracle, seed=0):
    rng = np.random.default_rng(seed)
    C = K * RESTARTS  # one search per (class, restart)
    cls = np.repeat(np.arange(K), RESTARTS)
    w = rng.normal(0.0, 1.0, (C, RES, RES))
    m1, m2 = np.zeros_like(w), np.zeros_like(w)
    best = np.full(C, -np.inf)
    for step in range(1, STEPS + 1):
        u = rng.normal(0.0, 1.0, (C, PAIRS, RES, RES))
        wp = np.concatenate([w[:, None] + SIGMA * u, w[:, None] - SIGMA * u, w[:, None]], axis=1)
        x = 1.0 / (1.0 + np.exp(-upsample(wp)))
        p = oracle.predict_proba(x.reshape(-1, 1, HW, HW).astype(np.float32)).reshape(C, 2 * PAIRS + 1, K)
        logp = np.log(np.clip(p, 1e-45, 1.0))
        f = margins(logp.reshape(-1, K)).reshape(C, 2 * PAIRS + 1, K)[np.arange(C), :, cls]  # (C, 2P+1)
        best = np.maximum(best, f.max(axis=1))
        fp, fm = f[:, :PAIRS], f[:, PAIRS:2 * PAIRS]
        g = ((fp - fm)[:, :, None, None] * u).mean(axis=1) / (2 * SIGMA)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        w = w + LR * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-8)
    r = best.reshape(K, RESTARTS)
    return r


def anomaly(r):
    k = int(np.argmax(r))
    others = np.delete(r, k)
    med = np.median(others)
    mad = np.median(np.abs(others - med)) * 1.4826 + 1e-6
    return k, float((r[k] - med) / mad)


def main():
    paths = sorted(glob.glob("cache/vendor-zoo/*.onnx"))
    if NAMES:
        paths = [p for p in paths if Path(p).stem in NAMES]
    rows = []
    for p in paths:
        name = Path(p).stem
        meta = json.loads(Path(p).with_suffix(".json").read_text())["summary"]
        tag = f"{name}-{STEPS}-{PAIRS}-{RESTARTS}-{RES}"
        out = CACHE / f"{tag}.json"
        if out.exists():
            row = json.loads(out.read_text())
        else:
            oracle = ModelOracle(p, batch_size=4096)
            t0 = time.time()
            r = statistic(oracle)
            row = {"name": name, "targets": meta.get("targets", []), "r": r.tolist(), "queries": oracle.queries,
                   "seconds": round(time.time() - t0, 1)}
            out.write_text(json.dumps(row))
        r = np.mean(row["r"], axis=1)
        k, z = anomaly(r)
        spread = np.std(row["r"], axis=1).mean()
        print(f"{name:24s} targets {str(row['targets']):10s} argmax {k} anomaly {z:6.2f} "
              f"r={np.round(r, 1).tolist()} restart-sd {spread:.2f} ({row['queries']} q, {row['seconds']} s)",
              flush=True)
        rows.append(row)


if __name__ == "__main__":
    main()
