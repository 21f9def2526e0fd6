"""`trojan-gate benchmark strip`: the run-time check against STRIP, per trigger kind and architecture.

For each lab trojan of the shared zoo (`zoo.RUNTIME_MODELS`: small patch on class 0, large pattern
on 2, blend on 6, watermark on 0, three and five targets; trained at `--seed`, each `--archs`
architecture from the same entries) on Fashion-MNIST, the test split is cut (seeded) into a
held-out set (the defender's: STRIP's bank, the check's calibration set and, for `reference`, the
training set of a clean reference classifier), clean evaluation inputs, and stamped inputs
(true class not a target; only those the trojan really hijacks count towards FAR). Per detector:
measured FRR on the clean inputs, FAR on the stamped ones, and the model queries per input:

- `STRIP` the paper's test as the project runs it (N = 10, rule max, normal-fit threshold at preset FRR);
- `check` the run-time check (`gates.runtime`): entropy and reference disagreement, min-p combined,
  adaptive N; `check, full N` the same without early stopping; `check + dispersion` with the
  dispersion of the copies as a third statistic;
- each statistic alone (same calibration, one statistic).

Then guarded throughput at batch 256 (plain model, STRIP, the check). The reference classifier
depends on the held-out data only, so one is trained per benchmark run and shared by every model.
"""
from __future__ import annotations

import time

import numpy as np

from .tables import publish
from .timing import interleaved_medians
from .zoo import RUNTIME_MODELS, ZOO, lab_config

HELP = "the run-time check (entropy, dispersion, reference disagreement, adaptive N) against STRIP, per trigger kind"


def add_arguments(p):
    p.add_argument("--triggers", default=",".join(RUNTIME_MODELS), help=f"subset of {','.join(RUNTIME_MODELS)}")
    p.add_argument("--archs", default="small", help="comma list of lab architectures (small, deep)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=30000)
    p.add_argument("--heldout", type=int, default=4000, help="held-out images (half train the reference)")
    p.add_argument("--n-eval", type=int, default=2000, help="clean and stamped evaluation inputs (each)")
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="lab, split and detector seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the markdown tables here")


def _rates(flags_clean, flags_troj) -> tuple[float, float]:
    return float(np.mean(flags_clean)), float(1.0 - np.mean(flags_troj)) if len(flags_troj) else float("nan")


def evaluate(oracle, lab, test, split, reference, args) -> dict:
    from trojan_gate.gates import Strip
    from trojan_gate.gates.runtime.check import DEFAULT_STATISTICS, STATISTICS
    from trojan_gate.gates.runtime.detector import RuntimeCheck

    held, clean, troj_all = split
    targets = list(lab.config.targets)
    troj = troj_all[~np.isin(test.y[troj_all], targets)][:args.n_eval]
    x_held, x_clean, x_troj = test.x[held], test.x[clean], lab.stamp(test.x[troj])
    effective = np.isin(oracle.predict(x_troj), targets)
    x_eff = x_troj[effective]
    out = {"clean_accuracy": lab.clean_accuracy, "asr": lab.attack_success_rate, "effective": float(effective.mean())}
    strip = Strip(oracle, n_perturbations=10, seed=args.seed, progress=False).fit(x_held).infer_threshold(args.frr)
    out["STRIP"] = (*_rates(strip.score(x_clean) >= strip.threshold_, strip.score(x_eff) >= strip.threshold_), 11.0, 11.0)
    half = x_held[len(x_held) // 2:]  # the reference trained on the first half
    for name, stats in [("check", DEFAULT_STATISTICS), ("check + dispersion", STATISTICS)] + [(s, (s,)) for s in STATISTICS]:
        rc = RuntimeCheck(oracle, statistics=stats, seed=args.seed, reference=reference, progress=False)
        rc.fit(half, test.y[held][len(held) // 2:]).infer_threshold(args.frr)
        modes = (("", True), (", full N", False)) if name == "check" else (("", False),)
        for suffix, adaptive in modes:
            c, t = rc.predict(x_clean, adaptive), rc.predict(x_eff, adaptive)
            frr, far = _rates(c["data"]["is_trojaned"], t["data"]["is_trojaned"])
            out[name + suffix] = (frr, far, c["data"]["model_calls"].mean(), t["data"]["model_calls"].mean())
        if name == "check":
            out["frr_interval"] = rc.calibration_.frr_interval
            out["check_detector"] = rc
    return out


def throughput(oracle, strip_x, rc, x, repeats: int = 10) -> dict:
    """Inputs per second at batch 256 (median of `repeats` interleaved runs): plain model, STRIP guard, check guard."""
    from trojan_gate.gates import GuardedClassifier, Strip

    strip = Strip(oracle, n_perturbations=10, progress=False).fit(strip_x).infer_threshold(0.01)
    strip_guard, check_guard = GuardedClassifier(oracle, strip), GuardedClassifier(oracle, rc)
    runners = {"plain": lambda: oracle.predict_proba(x), "STRIP guard": lambda: strip_guard.predict(x),
               "check guard": lambda: check_guard.predict(x)}
    for f in runners.values():  # warm-up
        f()
    return {name: len(x) / seconds for name, seconds in interleaved_medians(runners, repeats).items()}


def run(args) -> int:
    import torch

    from trojan_gate.gates import ModelOracle
    from trojan_gate.gates.data import Dataset, load_fashion_mnist
    from trojan_gate.gates.classifier_training import train_reference
    from trojan_gate.gates.lab import train_lab_model

    torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist(True, limit=args.train_limit, seed=0), load_fashion_mnist(False)
    idx = np.random.default_rng([args.seed, 11]).permutation(len(test))
    held, clean, rest = idx[:args.heldout], idx[args.heldout:args.heldout + args.n_eval], idx[args.heldout + args.n_eval:]
    ref_part = held[:len(held) // 2]
    t0 = time.perf_counter()
    reference, ref_acc = train_reference(Dataset(test.x[ref_part], test.y[ref_part]), 10, epochs=40, seed=args.seed)
    ref_test = float((ModelOracle(reference).predict(test.x[clean]) == test.y[clean]).mean())
    print(f"reference classifier: {len(ref_part)} held-out images, clean accuracy {ref_test:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    triggers = args.triggers.split(",")
    unknown = sorted(set(triggers) - set(RUNTIME_MODELS))
    if unknown:
        raise ValueError(f"unknown trigger(s) {unknown}; choose from {','.join(RUNTIME_MODELS)}")
    rows, speed = [], None
    for arch in args.archs.split(","):
        for trigger in triggers:
            config = lab_config(ZOO[RUNTIME_MODELS[trigger]], args.epochs, arch=arch, seed=args.seed)
            lab = train_lab_model(train, test, config, progress=False, threads=args.threads)
            oracle = ModelOracle(lab.onnx_bytes)
            res = evaluate(oracle, lab, test, (held, clean, rest), reference, args)
            if speed is None:
                speed = throughput(oracle, test.x[held], res["check_detector"], test.x[clean][:256])
            rows.append((trigger, arch, res))
            print(trigger, arch, {k: v for k, v in res.items() if k != "check_detector"}, flush=True)
    text = markdown(rows, speed, ref_test, args)
    publish(text, args.out)
    return 0


def markdown(rows, speed, ref_acc, args) -> str:
    from trojan_gate.gates.runtime.check import STATISTICS

    detectors = ["STRIP", "check", "check, full N", "check + dispersion", *STATISTICS]
    lines = ["# The run-time check against STRIP", "",
             f"Command: `trojan-gate benchmark strip --triggers {args.triggers} --archs {args.archs} --epochs "
             f"{args.epochs} --heldout {args.heldout} --seed {args.seed}` ({time.strftime('%Y-%m-%d')}). Lab CNNs "
             f"trained {args.epochs} epochs on {args.train_limit} Fashion-MNIST images; {args.heldout} held-out "
             f"images (half train the reference classifier, clean accuracy {ref_acc:.3f}; half calibrate), "
             f"{args.n_eval} clean and up to {args.n_eval} stamped evaluation inputs; preset FRR {args.frr:.0%}. "
             "FAR counts stamped inputs the trojan hijacks; queries per input = the input itself + its copies.", "",
             "| trigger | arch | clean acc / ASR | " + " | ".join(f"{d}: FRR / FAR" for d in detectors) +
             " | check: queries per clean / stamped input | check FRR 95% interval (calibration) |",
             "|---|---|---|" + "---|" * (len(detectors) + 2)]
    for trigger, arch, r in rows:
        cells = [f"{100 * r[d][0]:.2f}% / {100 * r[d][1]:.2f}%" for d in detectors]
        lo, hi = r["frr_interval"]
        lines.append(f"| {trigger} | {arch} | {100 * r['clean_accuracy']:.1f}% / {100 * r['asr']:.1f}% | "
                     + " | ".join(cells) + f" | {r['check'][2]:.2f} / {r['check'][3]:.2f} | {100 * lo:.2f}–{100 * hi:.2f}% |")
    if speed:
        plain, calls = speed["plain"], rows[0][2]["check"][2]
        lines += ["", "Throughput at batch 256 (inputs/s, median of 10 interleaved runs, first model): " + ", ".join(
            f"{k} {v:.0f}" for k, v in speed.items()) + f"; STRIP guard = {speed['STRIP guard'] / (plain / 11):.2f} x "
            f"plain/11; check guard = {speed['check guard'] / (plain / calls):.2f} x plain/{calls:.2f} (its mean "
            "queries per clean input)."]
    return "\n".join(lines) + "\n"
