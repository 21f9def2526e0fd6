"""Experiment: do the scanned model's measured triggers transfer to the benign reference models?

Reproduces `benchmarks/trigger-transfer.md`. For each zoo model it runs the scan's own steps
(the held-out split, 3 reference models and their statistics, then inversion, generator and
statistic on the scanned model, all with the scan's seeds) and measures, per class:
- tau: the share of stamped substitute images the scanned model's measured trigger (support and
  scale as its statistic found them) moves to the class on each reference model (what
  `ScanResult.transfer_rates` reports);
- s50 / s99: how steep the success curve is on the scanned model (scale for 50% over scale for 99%);
- the scale each reference model needs for the same trigger (50% and 99% success).

    python benchmarks/trigger_transfer.py run SEED MODEL... > out.jsonl   # models from runs/zoo
    python benchmarks/trigger_transfer.py analyse out.jsonl [--factor 0.5]
"""
import json
import sys

import numpy as np
import torch

from trojan_gate.gates.anomaly import double_mad_test
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.reference import split_heldout, train_reference
from trojan_gate.gates.scan import ScanConfig, _measure
from trojan_gate.gates.statistic import _smallest_scale, draw_seed

TRUTH = {"benign-small-s0": [], "benign-small-s1": [], "benign-deep-s0": [], "pattern-small": [2],
         "blend-small": [6], "patch-small": [0], "multi-patch-small": [1, 4, 7], "multi-259-small": [2, 5, 9],
         "multi5-small": [0, 2, 3, 6, 8], "patch-deep": [3]}


def profile(o, seed, inv, trainer, st):
    x, y = inv.x_, np.asarray(inv.y_)
    out, trig = [], []
    for t in range(o.n_classes):
        src = x[y != t]
        d = st.masks[t] * trainer.generator_.raw_sample(t, len(src), seed=draw_seed(seed + 2, t))
        s99 = float(st.scales[t])

        def succ(s):
            return float((o.predict_proba(np.clip(src + s * d, 0, 1)).argmax(1) == t).mean())

        out.append({"s99": s99, "s50": _smallest_scale(succ, 0.5, s99, 8),
                    "curve": [succ(s99 * f) for f in (0.25, 0.5, 0.75)]})
        trig.append((src, d * s99))
    return out, trig


def run(seed, names, zoo="runs/zoo"):
    from trojan_gate.pipelines.benchmark_deepinspect import clean_subset

    torch.set_num_threads(2)
    held = clean_subset(120)
    cfg = ScanConfig().resolved((1, 28, 28))
    sub, train = split_heldout(held, cfg.n_per_class, 10, seed=seed + 5)
    refs = []
    for j in range(cfg.reference_models):
        b, _ = train_reference(train, 10, epochs=cfg.reference_epochs, seed=seed + 100 + j)
        o = ModelOracle(b)
        inv, tr, st, _ = _measure(o, sub, seed, None, cfg, False, {})
        refs.append({"o": o, "stat": st.statistics.tolist(), "prof": profile(o, seed, inv, tr, st)[0]})
    for name in names:
        o = ModelOracle(f"{zoo}/{name}.onnx")
        inv, tr, st, _ = _measure(o, sub, seed, None, cfg, False, {})
        prof, trig = profile(o, seed, inv, tr, st)
        transfer, ref50, ref99 = [], [], []
        for t, (src, d) in enumerate(trig):
            row, r50, r99 = [], [], []
            for r in refs:
                def sc(s, r=r):
                    return float((r["o"].predict_proba(np.clip(src + s * d, 0, 1)).argmax(1) == t).mean())
                row.append(sc(1.0))
                r50.append(_smallest_scale(sc, 0.5, 8.0, 10))
                r99.append(_smallest_scale(sc, 0.99, 8.0, 10))
            transfer.append(row)
            ref50.append(r50)
            ref99.append(r99)
        print(json.dumps({"name": name, "seed": seed, "stat": st.statistics.tolist(), "prof": prof,
                          "transfer": transfer, "ref50": ref50, "ref99": ref99,
                          "refs": [{"stat": r["stat"], "prof": r["prof"]} for r in refs]}), flush=True)


def analyse(path, factor=0.5):
    print("| model | truth | flagged by the df test | tau / median tau of those | kept at factor "
          f"{factor:g} | steepness s50/s99 of the target(s) (references) |")
    print("|---|---|---|---|---|---|")
    for line in open(path):
        d = json.loads(line)
        stat = np.array(d["stat"])
        refstat = np.array([r["stat"] for r in d["refs"]])
        test = double_mad_test(np.log(stat) - np.log(refstat).mean(0), 2.0, min_mad=0.15)
        tau = np.mean(d["transfer"], 1)
        med = float(np.median(tau))
        kept = [t for t in test.flagged if tau[t] <= factor * med]
        truth = TRUTH.get(d["name"], [])

        def steep(p):
            return (p["s50"] or 0.0) / p["s99"]

        st = ", ".join(f"{t}: {steep(d['prof'][t]):.2f} ({np.mean([steep(r['prof'][t]) for r in d['refs']]):.2f})"
                       for t in truth) or "-"
        ratios = ", ".join(f"{t}: {tau[t] / med:.2f}" for t in test.flagged) or "-"
        print(f"| {d['name']} | {truth or 'clean'} | {test.flagged or '-'} | {ratios} | {kept or '-'} | {st} |")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]), sys.argv[3:])
    else:
        f = float(sys.argv[sys.argv.index("--factor") + 1]) if "--factor" in sys.argv else 0.5
        analyse(sys.argv[2], f)
