"""Experiment: does a trojan's recovered trigger drive the model to certainty faster than a
natural class's? (results in the README's DeepInspect section, *Not robust across draws*).

A backdoor is learnt to win outright; a natural feature might only tip the argmax. For every
class t of every zoo model, from a scan with the held-out substitute set and no reference models
(seed S), the other classes' substitute images are stamped with t's recovered trigger on its
winning support at 1, 1.5, 2 and 3 times the statistic's scale, and the median confidence
-log10(1 - p_t) is read from the oracle (capped at 12).

Usage: python benchmarks/trigger_saturation.py [SEED] [MODELS]
"""
import sys

import numpy as np
import torch

from trigger_robustness import zoo_scans
from trojan_gate.gates.statistic import draw_seed
from trojan_gate.pipelines.benchmark_deepinspect import ZOO, clean_subset

FACTORS = (1.0, 1.5, 2.0, 3.0)


def main():
    torch.set_num_threads(2)
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else [e.name for e in ZOO]
    for e, orc, res, _ in zoo_scans(names, clean_subset(120, seed=0), seed):
        x, y, gen = res.inverted_x, res.inverted_y, res.generator
        print(e.name, e.targets, "flagged", res.flagged_classes, flush=True)
        for t in range(len(res.statistics)):
            src = x[y != t]
            d = gen.raw_sample(t, len(src), seed=draw_seed(seed + 2, t)) * res.trigger_masks[t]
            conf = []
            for k in FACTORS:
                p = orc.predict_proba(np.clip(src + k * float(res.trigger_scales[t]) * d, 0, 1))[:, t]
                conf.append(float(np.median(-np.log10(np.clip(1 - p, 1e-12, 1)))))
            print(f"  class {t} stat {res.statistics[t]:.0f} | median -log10(1 - p_t) at x"
                  + ", x".join(f"{k:g}: {c:.2f}" for k, c in zip(FACTORS, conf)), flush=True)


if __name__ == "__main__":
    main()
