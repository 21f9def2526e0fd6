"""Experiment: is a trojan target reached equally easily from every source class?

A backdoor is learnt to override any input, so the level its trigger needs should hardly depend
on the source class; a naturally easy class (bag, sandal on Fashion-MNIST) is easy from the
garments that look like it and hard from the others. For every class t of every zoo model, from
a scan with the held-out substitute set and no reference models (seed S), the scan's winning
support of t's recovered trigger is bisected on the oracle separately per source class s: the
smallest level moving >= TARGET of the substitute images of s to t. Printed per class: the
scan's statistic, the per-source levels, and their spread (standard deviation of the log levels
over the sources, and the log ratio of the hardest to the easiest source).

Usage: python benchmarks/source_spread.py [SEED] [MODELS] [TARGET]
"""
import sys
import time

import numpy as np
import torch

from trigger_robustness import zoo_scans
from trojan_gate.gates.statistic import _smallest_scale, draw_seed
from trojan_gate.pipelines.benchmark_deepinspect import ZOO, clean_subset

MAX_SCALE = 16.0


def main():
    torch.set_num_threads(2)
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    names = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else [e.name for e in ZOO]
    target = float(sys.argv[3]) if len(sys.argv) > 3 else 0.9
    held = clean_subset(120, seed=0)
    for e, orc, res, t0 in zoo_scans(names, held, seed):
        x, y, gen = res.inverted_x, res.inverted_y, res.generator
        spread, rows = [], []
        for t in range(10):
            src_all = y != t
            raw = gen.raw_sample(t, int(src_all.sum()), seed=draw_seed(seed + 2, t)) * res.trigger_masks[t]
            levels = []
            for s in range(10):
                if s == t:
                    levels.append(np.nan)
                    continue
                pick = y[src_all] == s
                src, d = x[src_all][pick], raw[pick]
                l1 = float(np.abs(d).reshape(len(d), -1).sum(1).mean())

                def success(k, src=src, d=d):
                    return float((orc.predict_proba(np.clip(src + k * d, 0, 1)).argmax(1) == t).mean())
                k = _smallest_scale(success, target, MAX_SCALE, 10)
                levels.append(MAX_SCALE * l1 if k is None else k * l1)
            lv = np.log(np.array(levels))
            sd = float(np.nanstd(lv))
            rng_ = float(np.nanmax(lv) - np.nanmin(lv))
            spread.append(sd)
            rows.append((t, res.statistics[t], levels, sd, rng_))
        print(e.name, e.targets, "seconds", round(time.time() - t0), "flagged", res.flagged_classes,
              "df", np.round(res.deviation_factors, 2).tolist(), flush=True)
        for t, stat, levels, sd, rng_ in rows:
            lv = " ".join("  -" if np.isnan(v) else f"{v:4.0f}" for v in levels)
            print(f"  class {t}: stat {stat:5.0f} | per source {lv} | sd(log) {sd:.2f} range(log) {rng_:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
