"""`trojan-gate benchmark strip`: STRIP FAR/FRR on Fashion-MNIST lab models, and its cost.

For each lab trigger (all-to-one patch, large pattern, blend, multi-target patch; the
checkerboard patch on request) a small CNN is trained on Fashion-MNIST. The test split is
shuffled (seeded) and cut in three: held-out images (bank and calibration), 2000 clean
evaluation images, and 2000 trojaned evaluation images (stamped test images whose true
class is not a target). For every superimposition rule and N, the detector is fitted on
the held-out images and, at preset FRR 0.5/1/2%, the paper's Table III is filled: boundary
(normal rule, norm.ppf), measured FAR and measured FRR (the empirical-quantile boundary is
reported too). FAR is also given over "effective" trojans only (stamped inputs the model
does send to a target, Fig. 9). Then, at N=10, plain vs guarded latency for one input and
throughput at batch 256, with model calls and queries counted. Tables are printed, logged
to MLflow and written where `--out` says (hand-written notes after the notes marker are kept).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cli import EXIT_OK
from .timing import interleaved_medians
from .zoo import STRIP_TRIGGERS, ZOO, lab_config

HELP = "STRIP FAR/FRR (Table III layout) and guarded-serving cost on Fashion-MNIST lab models"

DEFAULT_TRIGGERS = ("patch", "pattern", "blend", "multi")  # "checker" runs on request (--triggers)
NOTES_MARKER = "<!-- notes: text below this line is kept when the benchmark rewrites the file -->"


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def add_arguments(parser):
    parser.add_argument("--triggers", type=_csv(str), default=list(DEFAULT_TRIGGERS),
                        help=f"comma list from {','.join(STRIP_TRIGGERS)} (default: {','.join(DEFAULT_TRIGGERS)})")
    parser.add_argument("--rules", type=_csv(str), default=["average", "sum", "max"], help="blend rules")
    parser.add_argument("--n", type=_csv(int), default=[10, 100], help="values of N (default 10,100)")
    parser.add_argument("--frr", type=_csv(float), default=[0.005, 0.01, 0.02], help="preset FRRs")
    parser.add_argument("--n-eval", type=int, default=2000, help="clean and trojaned evaluation inputs (each)")
    parser.add_argument("--n-heldout", type=int, default=2000, help="held-out images for bank and calibration")
    parser.add_argument("--epochs", type=int, default=2, help="lab training epochs")
    parser.add_argument("--arch", choices=("small", "deep"), default="small", help="lab architecture")
    parser.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analysis-rule", default="max",
                        help="rule whose misses are analysed at the first N and FRR 1%%")
    parser.add_argument("--timing-repeats", type=int, default=30)
    parser.add_argument("--torch-threads", type=int, default=1, help="threads for lab training")
    parser.add_argument("--quick", action="store_true",
                        help="small subset: patch only, N=10, 500 eval, 1000 held-out, 1 epoch")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="trojan-gate-benchmarks")


@dataclass
class Row:
    trigger: str
    rule: str
    n: int
    mean: float
    std: float
    frr_preset: float
    boundary: float
    far: float
    far_effective: float
    frr: float
    boundary_empirical: float
    far_empirical: float
    frr_empirical: float


def _split(test, n_heldout, n_eval, targets, seed):
    """Seeded disjoint held-out / clean-eval / trojan-eval indices of the test split."""
    idx = np.random.default_rng([seed, 11]).permutation(len(test))
    held = idx[:n_heldout]
    clean = idx[n_heldout:n_heldout + n_eval]
    rest = idx[n_heldout + n_eval:]
    troj = rest[~np.isin(test.y[rest], targets)][:n_eval]
    return held, clean, troj


def evaluate_trigger(name, oracle, lab, test, args, progress) -> tuple[list, dict]:
    from trojan_gate.gates import Strip

    targets = ZOO[STRIP_TRIGGERS[name]].targets
    held, clean, troj = _split(test, args.n_heldout, args.n_eval, targets, args.seed)
    x_held, x_clean = test.x[held], test.x[clean]
    x_troj = lab.stamp(test.x[troj])
    p_troj = oracle.predict_proba(x_troj)
    effective = np.isin(p_troj.argmax(axis=1), targets)
    p_target = p_troj[:, list(targets)].sum(axis=1)  # unperturbed probability mass on the target set
    info = {"trigger": name, "targets": list(targets), "clean_accuracy": lab.clean_accuracy,
            "attack_success_rate": lab.attack_success_rate, "eval_effective_trojans": float(effective.mean()),
            "n_heldout": len(held), "n_clean": len(clean), "n_trojaned": len(troj)}
    rows = []
    for rule in args.rules:
        for big_n in args.n:
            det = Strip(oracle, n_perturbations=big_n, blend=rule, seed=args.seed, progress=False)
            det.fit(x_held)
            s_clean, s_troj = -det.score(x_clean), -det.score(x_troj)  # the paper's axis: entropy H = -score
            for frr in args.frr:
                det.infer_threshold(frr)
                b, be = -det.normal_threshold_, -det.empirical_threshold_  # boundaries on H
                if (rule, big_n, frr) == (args.analysis_rule, args.n[0], 0.01):
                    missed = s_troj > b
                    info["anatomy"] = {
                        "rule": rule, "n": big_n, "frr": frr, "clean_mean_entropy": float(s_clean.mean()),
                        "trojan_mean_entropy": float(s_troj.mean()), "missed": int(missed.sum()),
                        "missed_effective": int((missed & effective).sum()),
                        "p_target_missed": float(p_target[missed].mean()) if missed.any() else float("nan"),
                        "p_target_caught": float(p_target[~missed].mean()) if (~missed).any() else float("nan")}
                rows.append(Row(name, rule, big_n, -det.mean_, det.std_, frr, b,
                                float((s_troj > b).mean()),
                                float((s_troj[effective] > b).mean()) if effective.any() else float("nan"),
                                float((s_clean <= b).mean()), be, float((s_troj > be).mean()),
                                float((s_clean <= be).mean())))
            progress.update(1)
    return rows, info


def _calls(oracle) -> int:
    return sum(p["calls"] for p in oracle.ledger.to_dict().values())


def timing(oracle, x_held, x_eval, rule, seed, repeats) -> dict:
    """Plain vs guarded (N=10): latency of one input, throughput at batch 256, calls and queries."""
    from trojan_gate.gates import GuardedClassifier, Strip

    det = Strip(oracle, n_perturbations=10, blend=rule, seed=seed, progress=False)
    det.fit(x_held).infer_threshold(0.01)
    guard = GuardedClassifier(oracle, det)
    one, batch = x_eval[:1], x_eval[:256]
    out = {"rule": rule, "n_perturbations": 10, "batch": len(batch)}
    fns = {"plain_1": lambda: oracle.predict_proba(one), "guarded_1": lambda: guard.predict(one),
           "plain_256": lambda: oracle.predict_proba(batch), "guarded_256": lambda: guard.predict(batch),
           "perturb_256": lambda: det.perturb(batch)}
    for k, fn in fns.items():  # warm-up, and one counted run to read calls and queries off the ledger
        fn()
        q0, c0 = oracle.queries, _calls(oracle)
        fn()
        out[k + "_calls_per_predict"] = _calls(oracle) - c0
        out[k + "_queries_per_predict"] = oracle.queries - q0
    # interleaved, so plain and guarded see the same machine load
    out.update({k + "_s": v for k, v in interleaved_medians(fns, repeats).items()})
    out["plain_throughput"] = len(batch) / out["plain_256_s"]
    out["guarded_throughput"] = len(batch) / out["guarded_256_s"]
    out["guarded_over_plain_div_11"] = out["guarded_throughput"] / (out["plain_throughput"] / 11)
    return out


# ----------------------------------------------------------------------------- tables
def _pct(v):
    return "n/a" if v != v else f"{100 * v:.2f}%"


def table_iii(rows) -> str:
    head = ("| trigger | rule | N | mean | std | preset FRR | boundary | FAR | FAR (effective) | FRR "
            "| empirical boundary | FAR (emp.) | FRR (emp.) |\n|" + "---|" * 13)
    lines = [head]
    for r in rows:
        lines.append(f"| {r.trigger} | {r.rule} | {r.n} | {r.mean:.3f} | {r.std:.3f} | {_pct(r.frr_preset)} "
                     f"| {r.boundary:.4f} | {_pct(r.far)} | {_pct(r.far_effective)} | {_pct(r.frr)} "
                     f"| {r.boundary_empirical:.4f} | {_pct(r.far_empirical)} | {_pct(r.frr_empirical)} |")
    return "\n".join(lines)


def rule_summary(rows, n_ref=10, frr_ref=0.01) -> tuple[str, dict]:
    """Mean FAR over triggers per rule at (N, FRR) = (n_ref, frr_ref); the lowest wins."""
    sel = [r for r in rows if r.n == n_ref and abs(r.frr_preset - frr_ref) < 1e-12]
    rules = sorted({r.rule for r in sel})
    triggers = list(dict.fromkeys(r.trigger for r in sel))
    if not sel:
        return "", {}
    means = {rule: float(np.mean([r.far for r in sel if r.rule == rule])) for rule in rules}
    lines = ["| rule | " + " | ".join(f"FAR {t}" for t in triggers) + " | mean FAR | mean FRR |",
             "|" + "---|" * (len(triggers) + 3)]
    for rule in rules:
        cells = []
        for t in triggers:
            match = [r for r in sel if r.rule == rule and r.trigger == t]
            cells.append(_pct(match[0].far) if match else "")
        frr = np.mean([r.frr for r in sel if r.rule == rule])
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {_pct(means[rule])} | {_pct(frr)} |")
    best = min(means, key=means.get)
    return "\n".join(lines), {"best_rule": best, "mean_far": means, "n": n_ref, "frr": frr_ref}


def timing_table(t) -> str:
    ms = lambda s: f"{1000 * s:.2f} ms"  # noqa: E731
    return "\n".join([
        "| | plain | guarded (N=10) |", "|---|---|---|",
        f"| latency, 1 input | {ms(t['plain_1_s'])} | {ms(t['guarded_1_s'])} |",
        f"| batch 256 time | {ms(t['plain_256_s'])} | {ms(t['guarded_256_s'])} |",
        f"| throughput at batch 256 | {t['plain_throughput']:.0f} inputs/s | {t['guarded_throughput']:.0f} inputs/s |",
        f"| model calls per predict (batch 256) | {t['plain_256_calls_per_predict']:.0f} "
        f"| {t['guarded_256_calls_per_predict']:.0f} |",
        f"| queries per predict (batch 256) | {t['plain_256_queries_per_predict']:.0f} "
        f"| {t['guarded_256_queries_per_predict']:.0f} |",
        f"| building the 2560 perturbations | | {ms(t['perturb_256_s'])} |",
        "",
        f"Guarded throughput / (plain throughput / 11) = **{t['guarded_over_plain_div_11']:.2f}** (target >= 0.8).",
    ])


def anatomy_table(models) -> str:
    lines = ["| trigger | clean mean H | trojaned mean H | missed trojans | of which effective "
             "| p(target), missed | p(target), caught |", "|---|---|---|---|---|---|---|"]
    for m in models:
        a = m.get("anatomy")
        if a:
            lines.append(f"| {m['trigger']} | {a['clean_mean_entropy']:.3f} | {a['trojan_mean_entropy']:.3f} "
                         f"| {a['missed']} / {m['n_trojaned']} | {a['missed_effective']} "
                         f"| {a['p_target_missed']:.3f} | {a['p_target_caught']:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render_markdown(models, rows, summary_md, summary, tim, meta) -> str:
    parts = ["# STRIP benchmark (Fashion-MNIST lab models)", "",
             f"Command: `{meta['command']}`  ", f"Measured: {meta['date']} on {meta['machine']}  ",
             f"Versions: {meta['versions']}", "",
             f"Setup: {meta['arch']} lab CNN per trigger, trained {meta['epochs']} epoch(s) on Fashion-MNIST; "
             f"the test split is shuffled (seed {meta['seed']}) into {meta['n_heldout']} held-out images "
             f"(perturbation bank and benign calibration), {meta['n_eval']} clean and up to {meta['n_eval']} "
             "trojaned evaluation inputs "
             "(stamped test images whose true class is not a target). Boundary = norm.ppf(FRR, mean, std) of the "
             "held-out benign entropies (the paper's rule); FAR = share of trojaned inputs scoring above it; "
             "FRR = share of clean inputs at or below it. FAR (effective) counts only stamped inputs the model "
             "actually sends to a target class.", "",
             "## Lab models", "",
             "| trigger | targets | clean acc. | ASR (lab) | effective trojans in eval set |", "|---|---|---|---|---|"]
    for m in models:
        parts.append(f"| {m['trigger']} | {m['targets']} | {_pct(m['clean_accuracy'])} "
                     f"| {_pct(m['attack_success_rate'])} | {_pct(m['eval_effective_trojans'])} |")
    parts += ["", "## Table III layout: preset FRR -> boundary -> measured FAR / FRR", "", table_iii(rows), ""]
    if summary_md:
        parts += [f"## Choice of the default superimposition rule (N={summary['n']}, preset FRR "
                  f"{_pct(summary['frr'])})", "", summary_md, "",
                  f"Lowest mean FAR: **{summary['best_rule']}**.", ""]
    anatomy = anatomy_table(models)
    if anatomy:
        a = next(m["anatomy"] for m in models if m.get("anatomy"))
        parts += [f"## Which trojaned inputs get through (rule {a['rule']}, N={a['n']}, preset FRR 1%)", "",
                  "H = normalised entropy on the evaluation inputs; p(target) = the model's probability mass on "
                  "the target set for the stamped input itself, unperturbed (mean over missed / caught inputs).", "",
                  anatomy, ""]
    if tim:
        parts += [f"## Cost at N=10 (rule {tim['rule']}, trigger {meta['timing_trigger']})", "",
                  f"Median of {meta['timing_repeats']} interleaved runs after a warm-up; "
                  "one oracle call per predict.", "",
                  timing_table(tim), ""]
    return "\n".join(parts)


def write_markdown(path, text):
    path = Path(path)
    notes = ""
    if path.is_file():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n\n" + NOTES_MARKER + (notes if notes else "\n"))


# ----------------------------------------------------------------------------- run
def run(args) -> int:
    import sys

    import onnxruntime
    import torch
    from tqdm.auto import tqdm

    from trojan_gate.gates import ModelOracle, __version__
    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.lab import train_lab_model
    from trojan_gate.gates.strip import BLEND_RULES, DEFAULT_BLEND

    if args.quick:
        args.triggers, args.n, args.n_eval, args.n_heldout, args.epochs = ["patch"], [10], 500, 1000, 1
    unknown = [t for t in args.triggers if t not in STRIP_TRIGGERS] + [r for r in args.rules if r not in BLEND_RULES]
    if unknown:
        raise ValueError(f"unknown trigger(s)/rule(s): {unknown}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    train = load_fashion_mnist(train=True, limit=args.train_limit, seed=args.seed)
    test = load_fashion_mnist(train=False)

    models, rows, tim = [], [], None
    timing_rule = DEFAULT_BLEND if DEFAULT_BLEND in args.rules else args.rules[0]
    bar = tqdm(total=len(args.triggers) * len(args.rules) * len(args.n), desc="strip benchmark")
    for name in args.triggers:
        entry = ZOO[STRIP_TRIGGERS[name]]
        targets = entry.targets
        lab = train_lab_model(train, test, lab_config(entry, args.epochs, arch=args.arch, seed=args.seed))
        oracle = ModelOracle(lab.onnx_bytes)
        trig_rows, info = evaluate_trigger(name, oracle, lab, test, args, bar)
        rows += trig_rows
        models.append(info)
        if tim is None:
            held, clean, _ = _split(test, args.n_heldout, args.n_eval, targets, args.seed)
            tim = timing(oracle, test.x[held], test.x[clean], timing_rule, args.seed, args.timing_repeats)
            timing_trigger = name
    bar.close()

    n_ref = 10 if 10 in args.n else args.n[0]
    summary_md, summary = rule_summary(rows, n_ref=n_ref)
    meta = {"command": "trojan-gate " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"ONNX Runtime {oracle.device}",
            "versions": f"trojan-gate {__version__}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}, "
                        f"torch {torch.__version__}",
            "seed": args.seed, "arch": args.arch, "epochs": args.epochs,
            "n_heldout": args.n_heldout, "n_eval": args.n_eval,
            "timing_trigger": timing_trigger, "timing_repeats": args.timing_repeats}
    md = render_markdown(models, rows, summary_md, summary, tim, meta)
    print(md)
    if args.out:
        write_markdown(args.out, md)
    if not args.no_mlflow:
        _log_mlflow(args, models, rows, summary, tim, md)
    return EXIT_OK


def _log_mlflow(args, models, rows, summary, tim, md):
    import mlflow
    import pandas as pd

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="strip-benchmark"):
        mlflow.log_params({"triggers": ",".join(args.triggers), "rules": ",".join(args.rules),
                           "n_values": ",".join(map(str, args.n)), "frr_values": ",".join(map(str, args.frr)),
                           "n_eval": args.n_eval, "n_heldout": args.n_heldout, "epochs": args.epochs,
                           "arch": args.arch,
                           "seed": args.seed, "best_rule": summary.get("best_rule")})
        metrics = {}
        for r in rows:
            key = f"{r.trigger}.{r.rule}.N{r.n}.frr{100 * r.frr_preset:g}"
            metrics[f"far.{key}"] = r.far
            metrics[f"frr.{key}"] = r.frr
        for m in models:
            metrics[f"clean_accuracy.{m['trigger']}"] = m["clean_accuracy"]
            metrics[f"attack_success_rate.{m['trigger']}"] = m["attack_success_rate"]
        if tim:
            for k in ("plain_1_s", "guarded_1_s", "plain_256_s", "guarded_256_s", "plain_throughput",
                      "guarded_throughput", "guarded_over_plain_div_11"):
                metrics[f"timing.{k}"] = tim[k]
        mlflow.log_metrics(metrics)
        mlflow.log_table(pd.DataFrame([r.__dict__ for r in rows]), "strip_table_iii.json")
        mlflow.log_text(md, "strip_benchmark.md")
        mlflow.log_dict(json.loads(json.dumps({"models": models, "summary": summary, "timing": tim},
                                              default=str)), "strip_benchmark.json")
