"""`trojan-gate benchmark strip`: the run-time check against STRIP, per trigger kind and architecture.

Per trojaned model (`runtime_models`: the lab zoo the check was tuned on, or the detection
benchmark's vendor-like test zoo it never saw) the defender's held-out set is halved (seeded):
one half trains the references, the other is STRIP's bank and the check's calibration set.
Per detector: measured FRR on clean inputs, FAR on stamped inputs the trojan really hijacks
(true class not a target, model's answer in the target set), and model calls per input:

- `STRIP` the paper's test as the project runs it (N = 10, rule max, normal-fit threshold at preset FRR);
- `check` the run-time check (`gates.runtime`): entropy and disagreement with a student distilled
  from the model (`gates.runtime.student`), min-p combined, adaptive N; `check, full N` without
  early stopping;
- `check (labels)` the check's first design: its reference trained on the held-out labels;
- each statistic alone (`entropy`; `reference`, the student disagreement; `activation`, the model's
  own hidden features against their clean class means, fitted on the half that distils the student).

`--statistics` sets the check's evidence (default the product's, `check.DEFAULT_STATISTICS`); the
labels reference check uses the same statistics with its reference swapped.

Beside the rates: the student's agreement with the model on clean inputs and its own attack success
on the stamped inputs (what it inherited). Every (model, seed, settings) result is cached in
`--results` (JSON lines), so a stopped run resumes. Then guarded throughput at batch 256 on the
first model (plain model, STRIP, the check) against plain/(calls + 1).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .runtime_models import ZOOS, subjects
from .tables import publish
from .timing import interleaved_medians
from .zoo import RUNTIME_MODELS

HELP = "the run-time check (entropy + distilled-student disagreement, adaptive N) against STRIP, per trigger kind"
DETECTORS = ("STRIP", "check", "check, full N", "check (labels)", "entropy", "reference", "activation")
RESULT_FORMAT = 2  # 2: the check's statistics in the key; the activation statistic alone


def default_vendor_models() -> list:
    """Every trojaned test-zoo entry of the vendor recipe on the small and the 6-conv architecture."""
    from .vendor_zoo import VENDOR_ZOO

    return [n for n, e in VENDOR_ZOO.items() if e.trojaned and e.recipe == "vendor" and e.arch in ("small", "deep")]


def add_arguments(p):
    from trojan_gate.gates.data import default_cache_dir

    cache = default_cache_dir()
    p.add_argument("--zoo", choices=ZOOS, default="lab", help="lab (tuning set) or vendor (the detection test zoo)")
    p.add_argument("--triggers", default=",".join(RUNTIME_MODELS), help=f"lab: subset of {','.join(RUNTIME_MODELS)}")
    p.add_argument("--archs", default="small", help="lab: comma list of architectures (small, deep)")
    p.add_argument("--epochs", type=int, default=2, help="lab: training epochs")
    p.add_argument("--train-limit", type=int, default=30000, help="lab: training images")
    p.add_argument("--heldout", type=int, default=4000, help="lab: held-out images (the vendor zoo's are 5,000)")
    p.add_argument("--models", default=",".join(default_vendor_models()),
                   help="vendor: trojaned test-zoo entries (default: every family, small and 6-conv)")
    p.add_argument("--zoo-dir", default=str(cache / "vendor-zoo"), help="vendor: cache of the trained test zoo")
    p.add_argument("--n-eval", type=int, default=2000, help="clean and stamped evaluation inputs (each)")
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--statistics", default=None, metavar="entropy,reference,...",
                   help="the check's statistics (default: the product's)")
    p.add_argument("--weights", default=None, metavar="entropy=W,reference=W",
                   help="the check's FRR budget split (default: equal shares, the plain min-p test)")
    p.add_argument("--seed", type=int, default=0, help="split and detector seed (and lab training seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(cache / "runtime-results.jsonl"), help="resumable result cache")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput line")
    p.add_argument("--out", default=None, help="also write the markdown tables here")


def _rates(flags_clean, flags_troj) -> tuple[float, float]:
    return float(np.mean(flags_clean)), float(1.0 - np.mean(flags_troj)) if len(flags_troj) else float("nan")


def evaluate(subject, labels_reference: bytes, args) -> dict:
    """Every detector's FRR / FAR / calls on one subject (see the module doc)."""
    from trojan_gate.gates import ModelOracle, Strip
    from trojan_gate.gates.runtime.activations import ClassFeatureNull
    from trojan_gate.gates.runtime.detector import RuntimeCheck
    from trojan_gate.gates.runtime.student import distil_student

    oracle = ModelOracle(subject.onnx)
    (ref_x, _), (cal_x, cal_y) = subject.halves()
    p_ref, h_ref = oracle.proba_and_hidden(ref_x)
    null = ClassFeatureNull().fit(h_ref, p_ref.argmax(axis=1), oracle.n_classes)
    x_clean = subject.clean_x
    effective = np.isin(oracle.predict(subject.stamped_x), subject.targets)
    x_eff = subject.stamped_x[effective]
    out = {"model": subject.name, "trigger": subject.trigger, "arch": subject.arch, "seed": args.seed,
           "clean_accuracy": subject.clean_accuracy, "asr": subject.attack_success, "effective": float(effective.mean()),
           "n_clean": len(x_clean), "n_stamped": int(len(x_eff))}
    t0 = time.perf_counter()
    student = distil_student(oracle, ref_x, seed=args.seed)
    out["student_seconds"] = round(time.perf_counter() - t0, 1)
    sp = ModelOracle(student)
    out["student_agreement"] = float((sp.predict(x_clean) == oracle.predict(x_clean)).mean())
    out["student_asr"] = float(np.isin(sp.predict(x_eff), subject.targets).mean()) if len(x_eff) else float("nan")
    strip = Strip(oracle, n_perturbations=10, seed=args.seed, progress=False).fit(subject.held_x).infer_threshold(args.frr)
    out["STRIP"] = (*_rates(strip.score(x_clean) >= strip.threshold_, strip.score(x_eff) >= strip.threshold_), 11.0, 11.0)
    weights = parse_weights(getattr(args, "weights", None))
    stats = check_statistics(args)
    runs = [("check", stats, student), ("check (labels)", stats, labels_reference),
            ("entropy", ("entropy",), None), ("reference", ("reference",), student), ("activation", ("activation",), None)]
    for name, stats, reference in runs:
        rc = RuntimeCheck(oracle, statistics=stats, seed=args.seed, reference=reference, progress=False,
                          activation_null=null, weights=weights if name.startswith("check") else None)
        rc.fit(cal_x, cal_y).infer_threshold(args.frr)
        modes = (("", True), (", full N", False)) if name in ("check", "check (labels)") else (("", False),)
        for suffix, adaptive in modes:
            if name + suffix not in DETECTORS:
                continue
            c, t = rc.predict(x_clean, adaptive), rc.predict(x_eff, adaptive)
            frr, far = _rates(c["data"]["is_trojaned"], t["data"]["is_trojaned"])
            out[name + suffix] = (frr, far, float(c["data"]["model_calls"].mean()),
                                  float(t["data"]["model_calls"].mean()) if len(x_eff) else float("nan"))
        if name == "check":
            out["frr_interval"] = list(rc.calibration_.frr_interval)
    return out


def throughput(subject, args, repeats: int = 10) -> dict:
    """Inputs per second at batch 256 (median of `repeats` interleaved runs): plain model, STRIP guard, check guard."""
    from trojan_gate.gates import GuardedClassifier, ModelOracle, Strip
    from trojan_gate.gates.runtime.detector import RuntimeCheck

    oracle = ModelOracle(subject.onnx)
    (_, _), (cal_x, cal_y) = subject.halves()
    x = subject.clean_x[:256]
    strip = Strip(oracle, n_perturbations=10, progress=False).fit(subject.held_x).infer_threshold(args.frr)
    rc = RuntimeCheck(oracle, seed=args.seed, progress=False).fit(subject.held_x, subject.held_y).infer_threshold(args.frr)
    strip_guard, check_guard = GuardedClassifier(oracle, strip), GuardedClassifier(oracle, rc)
    calls = float(rc.predict(subject.clean_x)["data"]["model_calls"].mean())
    runners = {"plain": lambda: oracle.predict_proba(x), "STRIP guard": lambda: strip_guard.predict(x),
               "check guard": lambda: check_guard.predict(x)}
    for f in runners.values():  # warm-up
        f()
    speed = {name: len(x) / seconds for name, seconds in interleaved_medians(runners, repeats).items()}
    return {"speed": speed, "calls": calls}


def check_statistics(args) -> tuple:
    """The check's statistics: --statistics, or the product's default."""
    from trojan_gate.gates.runtime.check import DEFAULT_STATISTICS

    text = getattr(args, "statistics", None)
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else tuple(DEFAULT_STATISTICS)


def parse_weights(text: str | None) -> dict | None:
    """'entropy=0.1,reference=0.9' -> {"entropy": 0.1, "reference": 0.9}; None stays None."""
    if not text:
        return None
    try:
        return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError as e:
        raise ValueError(f"--weights takes statistic=weight pairs, e.g. entropy=0.1,reference=0.9, not {text!r}") from e


def _key(subject, args) -> str:
    from trojan_gate.gates.hashing import sha256_bytes

    return json.dumps({"format": RESULT_FORMAT, "zoo": args.zoo, "model": sha256_bytes(subject.onnx)[:16],
                       "seed": args.seed, "frr": args.frr, "n_eval": args.n_eval, "n_heldout": len(subject.held_x),
                       "statistics": list(check_statistics(args)),
                       **({"weights": parse_weights(args.weights)} if getattr(args, "weights", None) else {})}, sort_keys=True)


def run(args) -> int:
    import torch

    from trojan_gate.gates.classifier_training import train_reference
    from trojan_gate.gates.data import Dataset

    torch.set_num_threads(args.threads)
    results = Path(args.results)
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec["result"]
    rows, speed, labels_ref = [], None, {}
    for subject in subjects(args):
        key = _key(subject, args)
        if key not in done:
            (ref_x, ref_y), _ = subject.halves()
            data_key = (len(ref_x), float(ref_x.sum()))
            if data_key not in labels_ref:  # depends on the held-out half only: one per run
                labels_ref[data_key] = train_reference(Dataset(ref_x, ref_y), 10, epochs=40, seed=args.seed)[0]
            done[key] = evaluate(subject, labels_ref[data_key], args)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps({"key": key, "result": done[key]}) + "\n")
        rows.append(done[key])
        print(json.dumps(done[key]), flush=True)
        if speed is None and not args.no_throughput:
            speed = throughput(subject, args)
    publish(markdown(rows, speed, args), args.out)
    return 0


def command(args) -> str:
    if args.zoo == "vendor":
        models = "" if args.models == ",".join(default_vendor_models()) else f" --models {args.models}"
        return f"trojan-gate benchmark strip --zoo vendor{models}{_check_options(args)} --seed {args.seed}"
    return (f"trojan-gate benchmark strip --triggers {args.triggers} --archs {args.archs} --epochs {args.epochs} "
            f"--heldout {args.heldout}{_check_options(args)} --seed {args.seed}")


def _check_options(args) -> str:
    stats = f" --statistics {args.statistics}" if getattr(args, "statistics", None) else ""
    return stats + (f" --weights {args.weights}" if getattr(args, "weights", None) else "")


def markdown(rows, speed, args) -> str:
    if args.zoo == "vendor":
        setting = ("the detection benchmark's test zoo (full training split, 6 epochs, vendor-style triggers; never used "
                   "to choose a setting); the defender's 5,000 held-out images (half distil the student and train the "
                   "labels reference, half calibrate)")
    else:
        setting = (f"lab models trained {args.epochs} epochs on {args.train_limit} images (the check's tuning set); "
                   f"{args.heldout} held-out images (half distil the student and train the labels reference, half "
                   "calibrate)")
    lines = ["# The run-time check against STRIP", "",
             f"Command: `{command(args)}` ({time.strftime('%Y-%m-%d')}). Fashion-MNIST, {setting}; "
             f"{args.n_eval} clean and up to {args.n_eval} stamped evaluation inputs; preset FRR {args.frr:.0%}. "
             "FAR counts stamped inputs the trojan hijacks; calls = the model's calls per input (the input itself + "
             "its copies; the check also asks its reference once). Student: agreement with the model on clean "
             "inputs / its own attack success on the stamped ones.", "",
             "| trigger | arch | model | clean acc / ASR | student: agreement / ASR | "
             + " | ".join(f"{d}: FRR / FAR" for d in DETECTORS)
             + " | check: calls per clean / stamped input | check FRR 95% interval (calibration) |",
             "|---|---|---|---|---|" + "---|" * (len(DETECTORS) + 2)]
    for r in rows:
        cells = [f"{100 * r[d][0]:.2f}% / {100 * r[d][1]:.2f}%" for d in DETECTORS]
        lo, hi = r["frr_interval"]
        lines.append(f"| {r['trigger']} | {r['arch']} | {r['model']} | {100 * r['clean_accuracy']:.1f}% / "
                     f"{100 * r['asr']:.1f}% | {100 * r['student_agreement']:.1f}% / {100 * r['student_asr']:.1f}% | "
                     + " | ".join(cells) + f" | {r['check'][2]:.2f} / {r['check'][3]:.2f} | "
                     f"{100 * lo:.2f}–{100 * hi:.2f}% |")
    if speed:
        s, calls = speed["speed"], speed["calls"]
        plain = s["plain"]
        lines += ["", "Throughput at batch 256 (inputs/s, median of 10 interleaved runs, first model): " + ", ".join(
            f"{k} {v:.0f}" for k, v in s.items()) + f"; STRIP guard = {s['STRIP guard'] / (plain / 11):.2f} x "
            f"plain/11; check guard = {s['check guard'] / (plain / (calls + 1)):.2f} x plain/({calls:.2f} + 1) (its "
            "mean calls per clean input, plus the reference's)."]
    return "\n".join(lines) + "\n"
