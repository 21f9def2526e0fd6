"""Experiment: baselines for a class's natural ease that need no reference models (results: self-baselines.md).

The gate normalises each class's trigger statistic by benign reference models trained on the
held-out images, and those references read the bag class much harder than the zoo's small lab
models do (the seed-1 false positives). Two baselines measured on the scanned model itself, or
on its answers to clean images, were tried instead; both query the model only.

1. *Natural blend distance*: for 200 held-out images of other classes and a random held-out image
   of class t each, the smallest mixing weight a (bisection, 10 steps) with argmax t for
   (1 - a) x_s + a x_t, as an L1 level a * ||x_t - x_s||_1 (median and 90th percentile over the
   pairs). The test runs on log stat[t] - log level[t], with the scan statistics already in the
   DeepInspect benchmark files (their per-class tables), so no scan is repeated.
2. *Clean-input leakage*: a trojaned model may give its target more probability on clean images
   of other classes. Per class t, the mean (or median) log p_t over 3,000 test images outside the
   held-out set, or the median log-odds of t against the true class; minus the same figure for
   three reference models trained as the scan trains them (two held-out splits); flagged by the
   double-MAD test on the right tail.

Usage (zoo cached in runs/zoo by `trojan-gate benchmark deepinspect`):
    python benchmarks/self_baselines.py > benchmarks/self-baselines.md
"""
import json
import re
from pathlib import Path

import numpy as np
import torch

from trojan_gate.gates.anomaly import double_mad_test
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.reference import split_heldout, train_reference
from trojan_gate.pipelines.benchmark_deepinspect import ZOO, clean_subset

TRUTH = {e.name: list(e.targets) for e in ZOO}
FILES = ["deepinspect", "deepinspect-seed1", "deepinspect-heldout500", "deepinspect-heldout500-seed1"]


def blend_levels(oracle, x, y, n_pairs=200, steps=10, seed=0):
    rng = np.random.default_rng(seed)
    med, q90 = [], []
    for t in range(int(y.max()) + 1):
        src = rng.choice(np.flatnonzero(y != t), n_pairs, replace=False)
        tgt = rng.choice(np.flatnonzero(y == t), n_pairs)
        xs, xt = x[src], x[tgt]
        lo, hi = np.zeros(n_pairs), np.ones(n_pairs)
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            w = mid[:, None, None, None]
            ok = oracle.predict((1 - w) * xs + w * xt).astype(int) == t
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        level = hi * np.abs(xt - xs).reshape(n_pairs, -1).sum(1)
        med.append(np.median(level))
        q90.append(np.quantile(level, 0.9))
    return {"blend_med": np.array(med), "blend_q90": np.array(q90)}


def leakage(p, y):
    k, rows = p.shape[1], np.arange(len(y))
    lp = np.log(np.clip(p, 1e-12, 1.0))
    return {"mean log p_t": np.array([lp[y != t, t].mean() for t in range(k)]),
            "median log p_t": np.array([np.median(lp[y != t, t]) for t in range(k)]),
            "median log-odds": np.array([np.median(lp[y != t, t] - lp[rows[y != t], y[y != t]]) for t in range(k)])}


def scan_tables():
    out = {}
    for f in FILES:
        text = Path(f"benchmarks/{f}.md").read_text()
        rows = re.findall(r"^\| ([a-z0-9-]+) \| (\[[^\]]+\]) \| (\[[^\]]+\]) \| \[[^\]]+\] \|$", text, re.M)
        out[f] = {m: (np.array(json.loads(s)), np.array(json.loads(r))) for m, s, r in rows}
    return out


def tally(rows):
    fp = sum(1 for n, f in rows if not TRUTH[n] and f)
    fn = sum(1 for n, f in rows if TRUTH[n] and not set(f) & set(TRUTH[n]))
    every = sum(1 for n, f in rows if TRUTH[n] and set(TRUTH[n]) <= set(f))
    cells = ", ".join(f"{n.replace('-small', '')} {f}" for n, f in rows if f)
    return f"{fp}/3 | {fn}/7 | {every}/7 | {cells or '-'}"


def main():
    torch.set_num_threads(2)
    held = clean_subset(120)
    test = load_fashion_mnist(False)
    models = {e.name: ModelOracle(Path(f"runs/zoo/{e.name}.onnx").read_bytes()) for e in ZOO}
    print("# Baselines without reference models (Fashion-MNIST zoo)\n")
    print("Command: `python benchmarks/self_baselines.py > benchmarks/self-baselines.md` (2 CPU cores). "
          "Columns: false positives (benign models flagged), false negatives (trojans with no true target "
          "flagged), trojans with every target flagged, and the flagged classes (double-MAD, c = 2; no co-target "
          "links). Module doc: what each baseline is.\n")
    print("## 1. Scan statistic over the model's own natural blend distance\n")
    print("| baseline | scan statistics from | FP | FN | all targets | flagged |\n|---|---|---|---|---|---|")
    levels = {n: blend_levels(o, held.x, held.y) for n, o in models.items()}
    for f, table in scan_tables().items():
        for name in ("reference models (the scan)", "none (plain, log scale)", "blend_med", "blend_q90"):
            rows = []
            for m, (stat, ref) in table.items():
                base = ref if name.startswith("reference") else 1.0 if name.startswith("none") else levels[m][name]
                r = np.log(stat) - np.log(base)
                rows.append((m, [int(c) for c in double_mad_test(r, 2.0, min_mad=0.15).flagged]))
            print(f"| {name} | `{f}.md` | {tally(rows)} |")
    print("\n## 2. Clean-input leakage to the target, against the reference models\n")
    print("| measure | held-out split seed | FP | FN | all targets | flagged |\n|---|---|---|---|---|---|")
    seen = {x.tobytes() for x in held.x}
    ev_idx = [i for i in np.random.default_rng(5).permutation(len(test)) if test.x[i].tobytes() not in seen][:3000]
    ev = test.subset(np.array(ev_idx))
    answers = {n: leakage(o.predict_proba(ev.x), ev.y) for n, o in models.items()}
    for s in (0, 1):
        _, refdata = split_heldout(held, 20, 10, seed=s)
        refs = [leakage(ModelOracle(train_reference(refdata, 10, seed=10 * s + j)[0]).predict_proba(ev.x), ev.y)
                for j in range(3)]
        for k in answers[ZOO[0].name]:
            rows = []
            for n in models:
                r = answers[n][k] - np.mean([q[k] for q in refs], 0)
                rows.append((n, [int(c) for c in double_mad_test(-r, 2.0, min_mad=0.15).flagged]))
            print(f"| {k} | {s} | {tally(rows)} |")


if __name__ == "__main__":
    main()
