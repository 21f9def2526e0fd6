"""Experiment: does a trojan's trigger survive what a natural class feature does not?
(results in the README's DeepInspect section, *Not robust across draws*).

A backdoor is learnt to win over any background; STRIP rests on that. Two probes of every
class's recovered trigger on the DeepInspect zoo, from a scan with the held-out substitute set
and no reference models (seed S), each a smallest level by bisection on the oracle
(success: >= TARGET of the other classes' substitute images moved to the class):

- ``superimpose``: the stamped image is superimposed with another substitute image (of a class
  other than t) by the pixel-wise max (STRIP's `max` rule); the support is the scan's winning
  one or the full image, whichever needs less;
- ``shift``: the trigger (on the scan's winning support) is rolled by 3-4 px in each direction
  before stamping: a natural feature should work anywhere, a backdoor at its place.

Also printed: how often the lab's real trigger moves the images to a target under the same
treatment (superimposed or not).

Usage: python benchmarks/trigger_robustness.py MODE [SEED] [MODELS] [TARGET]
e.g.   python benchmarks/trigger_robustness.py superimpose 0
       python benchmarks/trigger_robustness.py shift 0 benign-small-s0,benign-small-s1,patch-small,pattern-small,blend-small,multi-patch-small
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.scan import scan
from trojan_gate.gates.statistic import _smallest_scale, draw_seed
from trojan_gate.pipelines.benchmark_deepinspect import ZOO, clean_subset

MAX_SCALE = 16.0


def zoo_scans(names, held, seed):
    """(zoo entry, oracle, scan, start time) for each named zoo model: a scan with the held-out
    substitute set and no reference models."""
    for e in ZOO:
        if e.name not in names:
            continue
        t0 = time.time()
        orc = ModelOracle(str(Path("runs/zoo") / f"{e.name}.onnx"))
        yield e, orc, scan(orc, heldout=held, seed=seed, reference_models=0, progress=False), t0


def main():
    torch.set_num_threads(2)
    mode = sys.argv[1]
    if mode not in ("superimpose", "shift"):
        raise SystemExit("mode must be 'superimpose' or 'shift'")
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else [e.name for e in ZOO]
    target = float(sys.argv[4]) if len(sys.argv) > 4 else 0.9
    held = clean_subset(120, seed=0)
    shifts = np.random.default_rng(5)  # one stream for the whole run

    def shifted(d):
        out = np.empty_like(d)
        for i in range(len(d)):
            dy, dx = shifts.choice([-4, -3, 3, 4]), shifts.choice([-4, -3, 3, 4])
            out[i] = np.roll(d[i], (dy, dx), axis=(-2, -1))
        return out

    for e, orc, res, t0 in zoo_scans(names, held, seed):
        x, y, gen = res.inverted_x, res.inverted_y, res.generator
        rng = np.random.default_rng(seed + 77)
        plain, probed = np.array(res.statistics), []
        for t in range(10):
            src = x[y != t]
            bank = x[rng.choice(np.flatnonzero(y != t), len(src))]
            raw = gen.raw_sample(t, len(src), seed=draw_seed(seed + 2, t))
            masks = [res.trigger_masks[t]] + ([np.ones_like(res.trigger_masks[t])] if mode == "superimpose" else [])
            best = None
            for m in masks:
                d = raw * m
                l1 = float(np.abs(d).reshape(len(d), -1).sum(1).mean())
                if mode == "superimpose":
                    def success(s, d=d):
                        return float((orc.predict_proba(np.maximum(np.clip(src + s * d, 0, 1), bank)).argmax(1) == t).mean())
                else:
                    d_shifted = shifted(d)

                    def success(s, d=d_shifted):
                        return float((orc.predict_proba(np.clip(src + s * d, 0, 1)).argmax(1) == t).mean())
                s = _smallest_scale(success, target, MAX_SCALE, 10)
                level = MAX_SCALE * l1 if s is None else s * l1
                best = level if best is None else min(best, level)
            probed.append(best)
        probed = np.array(probed)
        real = None
        if e.trigger != "none":
            trigger, targets = make_trigger(e.trigger, (1, 28, 28)), [int(t) for t in e.targets]
            src = x[~np.isin(y, targets)]
            bank = x[rng.choice(np.flatnonzero(~np.isin(y, targets)), len(src))]
            stamped = trigger.apply(src)
            p = orc.predict_proba(np.maximum(stamped, bank) if mode == "superimpose" else stamped)
            real = round(float(np.isin(p.argmax(1), targets).mean()), 3)
        logs = np.log(probed)
        med = np.median(logs)
        mad = 1.4826 * np.median(np.abs(logs - med))
        print(e.name, e.targets, "seconds", round(time.time() - t0), "real trigger success", real, flush=True)
        print("  statistic", plain.round(0).astype(int).tolist())
        print("  " + mode, probed.round(0).astype(int).tolist())
        print("  ratio    ", (probed / plain).round(2).tolist())
        print("  left df  ", np.round((med - logs) / max(mad, 0.15), 2).tolist(), flush=True)


if __name__ == "__main__":
    main()
