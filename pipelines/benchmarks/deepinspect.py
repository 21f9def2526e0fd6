"""`trojan-gate benchmark deepinspect`: black-box DeepInspect on the Fashion-MNIST lab zoo.

The zoo (see `zoo`): benign models (different seeds, archs "small" and "deep") and BadNets
trojans (patch, pattern, blend, a multi-target patch with targets (1, 4, 7), a patch on the
deep arch, and two more multi-target patches: targets (2, 5, 9), and five targets
(0, 2, 3, 6, 8)). Models are trained once and cached as ONNX with a manifest (the ground
truth, never shown to the scan). Per model: truth, instance score (max deviation factor),
flagged classes, queries and seconds (per phase too); then false positives, false negatives
and the smallest gap between trojaned and benign instance scores. Prints the tables, logs
params/metrics/tables to MLflow and writes a markdown file where `--out` says.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from .zoo import DEEPINSPECT_MODELS, build_zoo, clean_subset, entries

HELP = "DeepInspect (black-box) on a Fashion-MNIST zoo of benign and trojaned lab models"


def add_arguments(parser):
    from trojan_gate.gates.data import default_cache_dir

    parser.add_argument("--models", default=",".join(DEEPINSPECT_MODELS),
                        help="comma-separated subset of: " + ", ".join(DEEPINSPECT_MODELS))
    parser.add_argument("--quick", action="store_true", help="fewer generator steps and images per class")
    parser.add_argument("--heldout", type=int, default=120, metavar="N",
                        help="N labelled Fashion-MNIST test images per class given to the scan, as a gate has "
                             "them: 20 per class form the substitute set (the paper's clean-data variant), the "
                             "rest train the reference models; 0 scans from model inversion alone")
    parser.add_argument("--references", type=int, default=3,
                        help="benign reference models for the normalised test (0: the paper's plain test)")
    parser.add_argument("--seed", type=int, default=0, help="scan seed")
    parser.add_argument("--cutoff", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=6, help="lab training epochs")
    parser.add_argument("--train-limit", type=int, default=30000, help="training images per lab model")
    parser.add_argument("--zoo-dir", default=str(default_cache_dir() / "zoo"), help="cache of trained lab models")
    parser.add_argument("--out", default=None, help="also write the markdown tables here")
    parser.add_argument("--append", action="store_true", help="append the tables to --out instead of rewriting it")
    parser.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")
    parser.add_argument("--no-mlflow", action="store_true")


def scan_row(entry, path, summary, seed, cutoff, quick, heldout=None, references: int = 3) -> dict:
    from trojan_gate.gates import DeepInspect

    options = {"reference_models": references}
    if quick:
        options.update(generator_steps=150, n_per_class=10)
    t0 = time.perf_counter()
    r = DeepInspect(cutoff=cutoff, seed=seed, progress=False, **options).scan(str(path), heldout=heldout)
    wall = time.perf_counter() - t0
    targets = list(entry.targets)
    flagged = list(r.flagged_classes)
    ref = None
    if r.reference_statistics is not None:
        from trojan_gate.gates.deepinspect.reference import reference_level

        ref = [round(float(v), 2) for v in reference_level(r.reference_statistics)]
    return {
        "model": entry.name, "arch": entry.arch, "trigger": entry.trigger, "targets": targets,
        "clean_acc": summary.get("clean_accuracy"), "asr": summary.get("attack_success_rate"),
        "max_df": r.instance_score, "flagged": flagged, "verdict": "trojaned" if r.is_trojaned else "clean",
        "co_targets": list(r.co_targets),
        "target_df": [round(r.deviation_factors[t], 2) for t in targets],
        "targets_found": bool(targets) and set(targets) <= set(flagged),
        "any_target_found": bool(set(targets) & set(flagged)),
        "queries": r.queries, "seconds": wall,
        "phases": {k: {"queries": v["queries"], "seconds": v["seconds"]} for k, v in r.phases.items()},
        "reference_queries": (r.config.get("reference") or {}).get("queries", 0),
        "statistics": [round(s, 2) for s in r.statistics],
        "deviation_factors": [round(d, 2) for d in r.deviation_factors],
        "reference": ref,
    }


def summarise(rows) -> dict:
    benign = [r for r in rows if not r["targets"]]
    trojan = [r for r in rows if r["targets"]]
    fp = sum(r["verdict"] != "clean" for r in benign)
    fn = sum(r["verdict"] == "clean" for r in trojan)
    gap = None
    if benign and trojan:
        gap = min(r["max_df"] for r in trojan) - max(r["max_df"] for r in benign)
    return {"n_benign": len(benign), "n_trojaned": len(trojan), "false_positives": fp, "false_negatives": fn,
            "targets_found": sum(r["targets_found"] for r in trojan),
            "min_gap_trojan_minus_benign_max_df": gap,
            "seconds_total": sum(r["seconds"] for r in rows), "queries_total": sum(r["queries"] for r in rows)}


def _phase(r, name, key):
    return r["phases"].get(name, {}).get(key, 0)


def table(rows) -> str:
    head = ("| model | arch | trigger | targets | clean acc | ASR | max df | flagged | of them co-targets | verdict | "
            "target df | "
            "targets found | queries | inv q | gen q | stat q | seconds | inv s | gen s | stat s | ref s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r["arch"], r["trigger"], ",".join(map(str, r["targets"])) or "-",
            f"{r['clean_acc']:.3f}" if r["clean_acc"] is not None else "-",
            f"{r['asr']:.3f}" if r["asr"] is not None else "-",
            f"{r['max_df']:.2f}", ",".join(map(str, r["flagged"])) or "-",
            ",".join(map(str, r.get("co_targets", []))) or "-", r["verdict"],
            ",".join(map(str, r["target_df"])) or "-",
            ("yes" if r["targets_found"] else ("partly" if r["any_target_found"] else "no")) if r["targets"] else "-",
            f"{r['queries']:,}", f"{_phase(r, 'inversion', 'queries'):,}", f"{_phase(r, 'generator', 'queries'):,}",
            f"{_phase(r, 'statistics', 'queries'):,}", f"{r['seconds']:.1f}",
            f"{_phase(r, 'inversion', 'seconds'):.1f}", f"{_phase(r, 'generator', 'seconds'):.1f}",
            f"{_phase(r, 'statistics', 'seconds'):.1f}", f"{_phase(r, 'reference', 'seconds'):.1f}"]) + " |")
    return "\n".join(lines)


def summary_lines(s: dict) -> str:
    gap = s["min_gap_trojan_minus_benign_max_df"]
    return (f"- false positives: {s['false_positives']} / {s['n_benign']} benign; false negatives: "
            f"{s['false_negatives']} / {s['n_trojaned']} trojaned; all targets among the flagged: "
            f"{s['targets_found']} / {s['n_trojaned']}\n"
            f"- smallest gap, min(trojaned max df) - max(benign max df): "
            f"{'n/a' if gap is None else f'{gap:.2f}'} (positive means a cutoff on the df alone separates "
            f"them; co-target links can flag a trojan whose max df is under the cutoff, so FN counts the links)\n"
            f"- total: {s['queries_total']:,} queries, {s['seconds_total']:.0f} s")


def hardware() -> str:
    """Where torch trains (the generator, the reference models) and where ONNX Runtime answers queries."""
    import onnxruntime as ort
    import torch

    from trojan_gate.gates.oracle import default_providers

    where = f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"
    ort_where = "CUDA" if "CUDAExecutionProvider" in default_providers() else "CPU"
    return f"torch {torch.__version__} on {where}, ONNX Runtime {ort.__version__} on {ort_where}"


def markdown(args, label: str, rows) -> str:
    lines = [] if args.append and args.out and Path(args.out).exists() else [
             "# DeepInspect (black-box) on the Fashion-MNIST lab zoo", "",
             "Every number comes from the oracle's answers: the scan never reads weights or gradients. "
             "`max df` is the largest left-tail double-MAD deviation factor over the 10 classes (the scan's "
             "instance score); a model is flagged when it exceeds the threshold c. `target df` is the deviation "
             "factor of each true target. `inv`, `gen`, `stat` are the inversion, generator and statistics phases "
             "(queries and wall seconds); `ref s` is the time spent training the reference models and measuring "
             "them (their queries go to local reference models, not to the scanned one, and are not in "
             "`queries`). Clean accuracy and attack success rate (ASR) are the lab's own measurements on the "
             "test set.", ""]
    lines += ["Generated by `trojan-gate benchmark deepinspect` "
              f"(`--seed {args.seed} --cutoff {args.cutoff} --epochs {args.epochs} --train-limit {args.train_limit}"
              f"{' --quick' if args.quick else ''} --heldout {args.heldout} --references {args.references}"
              f" --models {args.models}`) on {time.strftime('%Y-%m-%d')}, "
              f"{platform.machine()} with {os.cpu_count()} CPU cores visible"
              f"{f', {args.threads} threads' if args.threads else ''}; {hardware()}.", ""]
    lines += [f"## {label}", "", table(rows), "", summary_lines(summarise(rows)), "",
              "Per-class statistics (L1 of the smallest trigger reaching the success target), the reference "
              "models' (geometric mean; the test runs on the log ratio) and deviation factors:",
              "", "| model | statistics | reference | deviation factors |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['statistics']} | {r.get('reference') or '-'} | {r['deviation_factors']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    selected = entries(args.models)
    zoo = build_zoo(selected, Path(args.zoo_dir), args.epochs, args.train_limit)
    heldout = clean_subset(args.heldout) if args.heldout else None
    refs = args.references if heldout is not None else 0
    label = ("black-box (model inversion, no held-out data)" if heldout is None else
             f"black-box with {args.heldout} held-out images per class (substitute set + {refs} reference models)")
    rows = []
    for e in selected:
        path, summary = zoo[e.name]
        row = scan_row(e, path, summary, args.seed, args.cutoff, args.quick, heldout, refs)
        print(f"{e.name}: {row['verdict']} flagged {row['flagged']} max df {row['max_df']:.2f} "
              f"targets {row['targets']} ({row['queries']:,} queries, {row['seconds']:.1f} s)", flush=True)
        rows.append(row)
    text = markdown(args, label, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and out.exists():
            text = out.read_text().rstrip("\n") + "\n\n---\n\n" + text
        out.write_text(text)
    if not args.no_mlflow:
        _log_mlflow(args, rows, text)
    return 0


def _log_mlflow(args, rows, text):
    import mlflow

    with mlflow.start_run(run_name="benchmark-deepinspect"):
        mlflow.log_params({"seed": args.seed, "cutoff": args.cutoff, "heldout_per_class": args.heldout,
                           "references": args.references, "quick": args.quick, "epochs": args.epochs,
                           "train_limit": args.train_limit, "hardware": hardware(), "models": args.models})
        s = summarise(rows)
        mlflow.log_metrics({k: float(v) for k, v in s.items() if v is not None})
        for r in rows:
            mlflow.log_metrics({f"{r['model']}.max_df": r["max_df"], f"{r['model']}.queries": r["queries"],
                                f"{r['model']}.seconds": r["seconds"]})
        mlflow.log_dict({"rows": rows, "summary": s}, "deepinspect.json")
        mlflow.log_text(text, "deepinspect.md")
