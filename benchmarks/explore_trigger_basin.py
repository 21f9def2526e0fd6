"""Exploration (issue: calibrated scan, why forward-only evidence misses the 6-conv patch trojans): how wide is a
trigger's basin? For 200 Fashion-MNIST test images, the share sent into the trojan's targets when its own
random-content patch is stamped with 0, 1, 2, 4, 6 or 8 of its pixels flipped (mean over 5 draws of which pixels),
or shifted by one pixel down and right, beside the clean images' share.

usage: python benchmarks/explore_trigger_basin.py [names ...]"""
import json
import os
import sys
from pathlib import Path

import numpy as np

from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.metascan.triggers import Stamp
from trojan_gate.gates.oracle import ModelOracle

ZOO = Path(os.environ["TROJAN_GATE_CACHE"]) / "vendor-zoo"
NAMES = sys.argv[1:] or ["multi3-deep-s1100", "multi5-deep-s1100", "patch-deep-s1100", "multi3-small-s1100",
                         "patch-small-s1100"]


def main():
    test = load_fashion_mnist(train=False)
    x = np.asarray(test.x, np.float32).reshape(-1, 1, 28, 28)[np.random.default_rng(0).choice(len(test.x), 200,
                                                                                                replace=False)]
    for name in NAMES:
        summary = json.loads((ZOO / f"{name}.json").read_text())["summary"]
        stamp = Stamp(summary["trojan"]["stamp"], (1, 28, 28))
        oracle, targets = ModelOracle(str(ZOO / f"{name}.onnx")), summary["targets"]
        mask, pattern = stamp.opacity[0] > 0, stamp.pattern[0]
        cells = np.argwhere(mask)

        def share(images):
            return float(np.isin(oracle.predict_proba(images).argmax(1), targets).mean())

        row = []
        for flips in (0, 1, 2, 4, 6, 8):
            rates = []
            for draw in range(5):
                p = pattern.copy()
                for a, b in cells[np.random.default_rng(draw).choice(len(cells), flips, replace=False)]:
                    p[a, b] = 1.0 - p[a, b]
                stamped = x.copy()
                stamped[:, 0][:, mask] = p[mask]
                rates.append(share(stamped))
            row.append(f"flip {flips}: {np.mean(rates):.2f}")
        shifted = x.copy()
        shifted[:, 0, cells[:, 0] + 1, cells[:, 1] + 1] = pattern[cells[:, 0], cells[:, 1]]
        print(f"{name:20s} targets {str(targets):16s} patch {len(cells)} px  clean {share(x):.2f}  "
              + "  ".join(row) + f"  shift 1: {share(shifted):.2f}", flush=True)


if __name__ == "__main__":
    main()
