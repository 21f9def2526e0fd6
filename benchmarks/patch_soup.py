"""Experiment: patching with a uniform model soup (results in the README's patch section).

The spread between patcher seeds on one model (up to 1.25 points of clean accuracy) is as
large as any recipe difference measured, and fine-tuning runs that start from the same weights
can be averaged (Wortsman et al., "Model soups", ICML'22). Two ways, on the patch benchmark's
small lab models (cached by `patch_frozen_layers.py`, scanned as the gate scans):

- ``across``: patch once per seed with the default recipe (each seed also splits the held-out
  set its own way), then average the seeds' patched weights;
- ``within``: `ModelPatcher(soup=m)`, m runs on one split averaged inside the patcher (what the
  gate can use: `--patch-option soup=4`).

Clean accuracy change and true-trigger activation are measured on the benchmark's 2,000
evaluation images through ONNX Runtime.

Usage: python benchmarks/patch_soup.py across SEEDS [MODELS]
       python benchmarks/patch_soup.py within SEEDS [MODELS] [M]
e.g.   python benchmarks/patch_soup.py across 0,1,2,3 patch,blend,multi
       python benchmarks/patch_soup.py within 0,1,2,3 patch,blend,multi 4
"""
import json
import sys

import numpy as np
import torch

from patch_frozen_layers import experiment_model
from trojan_gate.gates import patching
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.pipelines.benchmark_patch import _acc, _asr


def main():
    torch.set_num_threads(2)
    mode, seeds = sys.argv[1], [int(v) for v in sys.argv[2].split(",")]
    models = (sys.argv[3] if len(sys.argv) > 3 else "patch,blend,multi").split(",")
    members = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    if mode not in ("across", "within"):
        raise SystemExit("mode must be 'across' or 'within'")
    for name in models:
        lab, res, held, ev, targets, acc0, flagged = experiment_model(name)

        def patch(seed, **options):
            pr = patching.ModelPatcher(seed=seed, progress=False, **options).fit(
                lab.onnx_bytes, res.inverted_x, res.inverted_y, res.generator.stamp, flagged,
                heldout=(held.x, held.y))
            return pr.onnx_bytes

        def measure(onnx_bytes):
            o = ModelOracle(onnx_bytes)
            return (round(100 * (_acc(o, ev.x, ev.y) - acc0), 2), round(100 * _asr(o, lab, ev.x, ev.y, targets), 1))

        rows, states = [], []
        for s in seeds:
            data = patch(s, **({"soup": members} if mode == "within" else {}))
            rows.append(measure(data))
            print(json.dumps({"model": name, "mode": mode, "seed": s, "accuracy_change_points": rows[-1][0],
                              "true_trigger_activation_pct": rows[-1][1]}), flush=True)
            if mode == "across":
                states.append(patching.onnx_to_torch(data).state_dict())
        summary = {"model": name, "mode": mode, "patched_against": flagged,
                   "mean": [round(float(v), 2) for v in np.mean(rows, 0)]}
        if mode == "across":
            soup = patching.onnx_to_torch(lab.onnx_bytes)
            soup.load_state_dict(patching.uniform_soup(states))
            summary["soup_of_the_seeds"] = measure(patching.torch_to_onnx(soup.eval()))
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
