"""Experiment: patch with the first K parametrised layers frozen (results in the README's patch section).

Part of the patching cost in clean accuracy is fine-tuning itself. Freezing the convolutional
feature extractor (K = 2 on the lab's small CNN: both conv layers; the dense head stays
trainable) keeps the learnt features and lets only the head unlearn the trigger's route to the
target. This script trains the patch benchmark's small lab models (6 epochs, seed 0; the same
calls as `trojan-gate benchmark patch --arch small --epochs 6`), scans them as the gate does
(2,000 held-out test images), caches model and scan, then patches with the default recipe and
K frozen layers, and measures clean accuracy change and true-trigger activation on the
benchmark's 2,000 evaluation images through ONNX Runtime.

The multi-target model's scan flags nothing on this copy of the model (see the README), so it
is patched against the classes its earlier benchmark copy was flagged on (4, 7).

Usage: python benchmarks/patch_frozen_layers.py K[,K...] SEEDS [MODELS]
e.g.   python benchmarks/patch_frozen_layers.py 0,2 0,1 patch,blend,multi
"""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from trojan_gate.gates import patching
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.scan import scan
from trojan_gate.pipelines.benchmark_patch import ZOO, _acc, _asr

CACHE = Path("runs/patch-lab")
EARLIER_FLAGS = {"multi": [4, 7]}


def cached(name):
    path = CACHE / f"{name}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    train, test = load_fashion_mnist(True), load_fashion_mnist(False)
    idx = np.random.default_rng(0).permutation(len(test))
    held, ev = test.subset(idx[:2000]), test.subset(idx[2000:4000])
    lab = train_lab_model(train, test, LabConfig(arch="small", seed=0, epochs=6, **ZOO[name]), progress=False)
    res = scan(ModelOracle(lab.onnx_bytes), heldout=held, seed=0, progress=False)
    d = dict(lab=lab, res=res, held=held, ev=ev)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(d))
    return d


def experiment_model(name):
    """(lab model, scan, held-out set, evaluation set, true targets, clean accuracy, classes to patch)."""
    d = cached(name)
    lab, res, held, ev = d["lab"], d["res"], d["held"], d["ev"]
    acc0 = _acc(ModelOracle(lab.onnx_bytes), ev.x, ev.y)
    flagged = res.flagged_classes or EARLIER_FLAGS.get(name, [])
    return lab, res, held, ev, list(lab.config.targets), acc0, flagged


_onnx_to_torch = patching.onnx_to_torch


def freezing(k):
    """patching.onnx_to_torch with the first k layers that hold parameters kept fixed."""
    def onnx_to_torch(data):
        clf = _onnx_to_torch(data)
        layers = [m for m in clf.modules() if list(m.parameters(recurse=False))]
        for m in layers[:k]:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        return clf
    return onnx_to_torch


def main():
    torch.set_num_threads(2)
    ks = [int(v) for v in sys.argv[1].split(",")]
    seeds = [int(v) for v in sys.argv[2].split(",")]
    models = (sys.argv[3] if len(sys.argv) > 3 else "patch,blend,multi").split(",")
    for name in models:
        lab, res, held, ev, targets, acc0, flagged = experiment_model(name)
        print(json.dumps({"model": name, "scan_flagged": res.flagged_classes, "scan_max_df": round(res.max_deviation_factor, 2),
                          "patched_against": flagged, "clean_acc": acc0}), flush=True)
        for k in ks:
            patching.onnx_to_torch = freezing(k)
            try:
                for s in seeds:
                    pr = patching.ModelPatcher(seed=s, progress=False).fit(
                        lab.onnx_bytes, res.inverted_x, res.inverted_y, res.generator.stamp, flagged,
                        heldout=(held.x, held.y))
                    o = ModelOracle(pr.onnx_bytes)
                    print(json.dumps({"model": name, "frozen_layers": k, "seed": s,
                                      "accuracy_change_points": round(100 * (_acc(o, ev.x, ev.y) - acc0), 2),
                                      "true_trigger_activation_pct": round(100 * _asr(o, lab, ev.x, ev.y, targets), 1)}),
                          flush=True)
            finally:
                patching.onnx_to_torch = _onnx_to_torch

if __name__ == "__main__":
    main()
