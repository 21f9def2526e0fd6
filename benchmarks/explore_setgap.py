"""Exploration (issue: calibrated scan, multi-target evidence): the largest probability gap a single input opens
between a set of K classes and the rest, a set-valued maximum margin. With p sorted descending,
g_K(x) = log p_(K)(x) - log p_(K+1)(x): every one of the top K classes beats every other class by g_K. A trigger
that sends a stamped input to a random one of K targets leaves ~1/K on each target and little elsewhere, so its
g_K is large; a benign model has to reach a K-way tie among its own classes far from the others. NES as in
explore_mmbd (antithetic Gaussian samples, Adam, x = sigmoid(w), w at RES x RES upsampled), R restarts per K.
Also prints g_K on 200 held-out test images stamped with the model's own trigger (a reference the search does not
see), and the top-K set at the search's best point.

usage: python benchmarks/explore_setgap.py STEPS PAIRS RESTARTS RES KMAX [names ...]"""
import glob
import os
import json
import sys
import time
from pathlib import Path

import numpy as np

from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.metascan.triggers import Stamp
from trojan_gate.gates.oracle import ModelOracle

ARGS = sys.argv[1:]
STEPS, PAIRS, RESTARTS, RES, KMAX = (int(a) for a in ARGS[:5])
NAMES = ARGS[5:]
SIGMA, LR, HW = 0.5, 0.15, 28
ZOO = Path(os.environ["TROJAN_GATE_CACHE"]) / "vendor-zoo"
CACHE = Path("/tmp/setgap")
CACHE.mkdir(parents=True, exist_ok=True)


def upsample(w):
    idx = (np.arange(HW) * RES) // HW
    return w[..., idx[:, None], idx[None, :]]


def gaps(logp, ks):  # (n, C) -> (n, len(ks)): log p_(K) - log p_(K+1)
    s = -np.sort(-logp, axis=1)
    return np.stack([s[:, k - 1] - s[:, k] for k in ks], axis=1)


def search(oracle, seed=0):
    rng = np.random.default_rng(seed)
    ks = np.repeat(np.arange(1, KMAX + 1), RESTARTS)
    c = len(ks)
    w = rng.normal(0.0, 1.0, (c, RES, RES))
    m1, m2 = np.zeros_like(w), np.zeros_like(w)
    best, best_x = np.full(c, -np.inf), np.zeros((c, HW, HW), np.float32)
    for step in range(1, STEPS + 1):
        u = rng.normal(0.0, 1.0, (c, PAIRS, RES, RES))
        wp = np.concatenate([w[:, None] + SIGMA * u, w[:, None] - SIGMA * u, w[:, None]], axis=1)
        x = (1.0 / (1.0 + np.exp(-upsample(wp)))).astype(np.float32)
        p = oracle.predict_proba(x.reshape(-1, 1, HW, HW)).reshape(c, 2 * PAIRS + 1, -1)
        logp = np.log(np.clip(p, 1e-45, 1.0))
        s = -np.sort(-logp, axis=2)
        f = np.take_along_axis(s, (ks - 1)[:, None, None], 2)[..., 0] - np.take_along_axis(s, ks[:, None, None], 2)[..., 0]
        i = f.argmax(axis=1)
        better = f[np.arange(c), i] > best
        best = np.where(better, f[np.arange(c), i], best)
        best_x[better] = x[np.arange(c), i][better]
        fp, fm = f[:, :PAIRS], f[:, PAIRS:2 * PAIRS]
        g = ((fp - fm)[:, :, None, None] * u).mean(axis=1) / (2 * SIGMA)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        w = w + LR * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-8)
    p = oracle.predict_proba(best_x[:, None])
    sets = [sorted(np.argsort(-p[j])[:ks[j]].tolist()) for j in range(c)]
    return best.reshape(KMAX, RESTARTS), [sets[j * RESTARTS:(j + 1) * RESTARTS] for j in range(KMAX)]


def main():
    test = load_fashion_mnist(train=False)
    x_ref = np.asarray(test.x[:200], np.float32).reshape(-1, 1, HW, HW)
    paths = sorted(glob.glob(str(ZOO / "*.onnx")))
    if NAMES:
        paths = [p for p in paths if Path(p).stem in NAMES]
    for path in paths:
        name = Path(path).stem
        summary = json.loads(Path(path).with_suffix(".json").read_text())["summary"]
        out = CACHE / f"{name}-{STEPS}-{PAIRS}-{RESTARTS}-{RES}-{KMAX}.json"
        if out.exists():
            row = json.loads(out.read_text())
        else:
            oracle = ModelOracle(path, batch_size=4096)
            t0 = time.time()
            g, sets = search(oracle)
            row = {"name": name, "targets": summary.get("targets", []), "g": g.tolist(), "sets": sets,
                   "queries": oracle.queries, "seconds": round(time.time() - t0, 1)}
            trojan = summary.get("trojan")
            if trojan:
                stamped = Stamp(trojan["stamp"], (1, HW, HW)).apply(x_ref)
                lp = np.log(np.clip(oracle.predict_proba(stamped), 1e-45, 1.0))
                row["stamped_median"] = np.median(gaps(lp, range(1, KMAX + 1)), axis=0).round(2).tolist()
            out.write_text(json.dumps(row))
        g = np.mean(row["g"], axis=1)
        best_sets = [row["sets"][k][int(np.argmax(row["g"][k]))] for k in range(KMAX)]
        print(f"{name:24s} targets {str(row['targets']):16s} g_K={np.round(g, 1).tolist()} "
              f"sets={best_sets[1:]} stamped={row.get('stamped_median')} ({row['queries']} q, {row['seconds']} s)",
              flush=True)


if __name__ == "__main__":
    main()
