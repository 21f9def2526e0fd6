"""Experiment: can the scan avoid the naturally easy classes some other way than its references do?

Reproduces `benchmarks/specific-triggers.md`. Three ideas, all measured on the zoo of
`trojan-gate benchmark deepinspect` (6 epochs, 30k images) with 120 held-out images per class:

1. `run`: a *differential* generator. Eq. 6 gains a term lam * mean_j p_ref_j(t | x') that
   penalises a trigger for moving the benign reference models to t as well (their gradients are
   exact: the references are local torch models). A backdoor is small *and* specific to its model;
   a natural class feature moves every model. The scanned model is still queried through the
   oracle only; the statistic is measured on it exactly as `scan()` does. The reference models'
   own "differential" statistics are measured with the other references as penalty.
   (The trainer is swapped in for `scan._trainer`: the experiment changes nothing else.)
2. `baselines`: normalise by the *benign lab models* themselves (leave-one-out: the other
   benign zoo models, scanned on the same substitute set and seed), as a gate that keeps the
   statistics of earlier approved models of the same task could; and by those plus the references.
3. `baselines` also averages the reference-normalised levels over two scan seeds.

    python benchmarks/specific_triggers.py run SEED LAM MODEL... > dSEED.jsonl   # models from runs/zoo
    python benchmarks/specific_triggers.py analyse dSEED.jsonl tSEED.jsonl       # t: trigger_transfer.py run
    python benchmarks/specific_triggers.py baselines t0.jsonl t1.jsonl
"""
import json
import sys
import time

import numpy as np
import torch

from trojan_gate.gates import scan as scan_module
from trojan_gate.gates.anomaly import double_mad_test
from trojan_gate.gates.generator import GeneratorTrainer
from trojan_gate.gates.lab import LabConfig, make_trigger, train_lab_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.reference import normalised_levels, split_heldout
from trojan_gate.gates.scan import ScanConfig, _measure
from trojan_gate.gates.transfer import transfer_rates

TRUTH = {"benign-small-s0": [], "benign-small-s1": [], "benign-deep-s0": [], "pattern-small": [2],
         "blend-small": [6], "patch-small": [0], "multi-patch-small": [1, 4, 7], "multi-259-small": [2, 5, 9],
         "multi5-small": [0, 2, 3, 6, 8], "patch-deep": [3]}


class DifferentialTrainer(GeneratorTrainer):
    """Eq. 6 + lam * mean_j p_ref_j(t | clip(x + Delta)): the gradient of the added term is exact."""

    nets: list = []
    lam: float = 2.0

    def _delta_grad(self, oracle, xs, tgt, delta, step):
        grad, outputs = super()._delta_grad(oracle, xs, tgt, delta, step)
        if not self.nets:
            return grad, outputs
        d = torch.from_numpy(np.ascontiguousarray(delta, np.float32)).requires_grad_()
        xp = (torch.from_numpy(np.asarray(xs, np.float32)) + d).clamp(0, 1)
        t = torch.from_numpy(np.asarray(tgt)).long()[:, None]
        penalty = sum(torch.softmax(net(xp), 1).gather(1, t).sum() for net in self.nets)
        (g,) = torch.autograd.grad(self.lam * penalty / len(self.nets), d)
        return grad + g.numpy(), outputs


def _differential_trainer(cfg, seed, progress):
    return DifferentialTrainer(
        estimator=cfg.estimator, n_pairs=cfg.n_pairs, sigma=cfg.sigma, tile=cfg.tile, steps=cfg.generator_steps,
        batch_per_class=cfg.batch_per_class, lr=cfg.generator_lr, gamma1=cfg.gamma1, gamma2=cfg.gamma2,
        thresh_fraction=cfg.thresh_fraction, success_target=cfg.success_target, success_rule=cfg.success_rule,
        adapt_every=cfg.adapt_every, adapt_factor=cfg.adapt_factor, z_dim=cfg.z_dim, hidden=cfg.hidden,
        variation=cfg.variation, device="cpu", seed=seed, progress=False)


def run(seed, lam, names, zoo="runs/zoo"):
    from trojan_gate.pipelines.benchmark_deepinspect import clean_subset

    torch.set_num_threads(2)
    scan_module._trainer = _differential_trainer
    DifferentialTrainer.lam = lam
    cfg = ScanConfig().resolved((1, 28, 28))
    sub, train = split_heldout(clean_subset(120), cfg.n_per_class, 10, seed=seed + 5)
    refs = []
    for j in range(cfg.reference_models):  # the scan's own reference models (same data, seeds, recipe)
        lab = train_lab_model(train, train, LabConfig(arch="small", trigger="none", epochs=cfg.reference_epochs,
                                                      batch_size=64, lr=2e-3, seed=seed + 100 + j), progress=False)
        net = lab.torch_model.eval().requires_grad_(False)
        refs.append((ModelOracle(lab.onnx_bytes), net))
    ref_stats = []
    for j, (oracle, _) in enumerate(refs):
        DifferentialTrainer.nets = [net for i, (_, net) in enumerate(refs) if i != j]
        ref_stats.append(_measure(oracle, sub, seed, None, cfg, False, {})[2].statistics.tolist())
    print(json.dumps({"name": "_references", "seed": seed, "lam": lam, "stat": ref_stats}), flush=True)
    DifferentialTrainer.nets = [net for _, net in refs]
    for name in names:
        t0 = time.perf_counter()
        inv, trainer, st, _ = _measure(ModelOracle(f"{zoo}/{name}.onnx"), sub, seed, None, cfg, False, {})
        rec = {"name": name, "seed": seed, "lam": lam, "stat": st.statistics.tolist(),
               "transfer": transfer_rates([o for o, _ in refs], trainer.generator_, st.masks, st.scales, inv.x_,
                                          np.asarray(inv.y_), seed=seed + 2, progress=False).tolist(),
               "seconds": round(time.perf_counter() - t0, 1)}
        if name.startswith("pattern"):  # is the recovered class-2 trigger the lab's pattern?
            mean_abs = np.abs(trainer.generator_.raw_sample(2, 64, seed=1) * st.masks[2]).mean(0).ravel()
            rec["pattern_correlation"] = float(np.corrcoef(mean_abs, make_trigger("pattern", (1, 28, 28)).mask.ravel())[0, 1])
        print(json.dumps(rec), flush=True)


def _cell(levels):
    test = double_mad_test(levels, 2.0, min_mad=0.15)
    return f"{test.flagged or '-'} {test.deviation_factors.max():.2f}"


def analyse(diff_path, plain_path):
    rows = [json.loads(line) for line in open(diff_path)]
    plain = {r["name"]: r for r in map(json.loads, open(plain_path))}
    ref_diff = np.log(np.asarray(rows[0]["stat"])).mean(0)
    print("| model | truth | plain generator / references (the scan) | differential alone | differential / "
          "references | differential / references' differential | target L1: plain → differential |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        p = plain[r["name"]]
        ref_plain = np.log([q["stat"] for q in p["refs"]]).mean(0)
        lp, ld = np.log(p["stat"]), np.log(r["stat"])
        truth = TRUTH[r["name"]]
        l1 = ", ".join(f"{t}: {p['stat'][t]:.0f} → {r['stat'][t]:.0f}" for t in truth) or "-"
        if "pattern_correlation" in r:
            l1 += f" (correlation with the pattern {r['pattern_correlation']:.2f})"
        cells = [_cell(v) for v in (lp - ref_plain, ld, ld - ref_plain, ld - ref_diff)]
        print(f"| {r['name']} | {truth or 'clean'} | " + " | ".join(cells) + f" | {l1} |")


def baselines(*paths):
    runs = [{r["name"]: r for r in map(json.loads, open(p))} for p in paths]
    benign = [n for n in runs[0] if not TRUTH[n]]
    print("| model | truth | seed | benign lab models (leave-one-out) | those + references | the scan (references) |")
    print("|---|---|---|---|---|---|")
    for n in runs[0]:
        for run_ in runs:
            r = run_[n]
            base = np.log([run_[b]["stat"] for b in benign if b != n])
            refs = np.log([q["stat"] for q in r["refs"]])
            lv = np.log(r["stat"])
            cells = [_cell(lv - base.mean(0)), _cell(lv - np.concatenate([base, refs]).mean(0)), _cell(lv - refs.mean(0))]
            print(f"| {n} | {TRUTH[n] or 'clean'} | {r['seed']} | " + " | ".join(cells) + " |")
    print()
    print("| model | truth | reference-normalised levels averaged over the seeds |")
    print("|---|---|---|")
    for n in runs[0]:
        lv = np.mean([normalised_levels(r[n]["stat"], [q["stat"] for q in r[n]["refs"]]) for r in runs], 0)
        print(f"| {n} | {TRUTH[n] or 'clean'} | {_cell(lv)} |")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1] == "analyse":
        analyse(sys.argv[2], sys.argv[3])
    else:
        baselines(*sys.argv[2:])
