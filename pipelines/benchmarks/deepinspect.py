"""`trojan-gate benchmark deepinspect`: black-box DeepInspect on a Fashion-MNIST lab zoo.

The zoo: benign models (different seeds, archs "small" and "deep") and BadNets trojans
(patch, pattern, blend, a multi-target patch with targets (1, 4, 7), a patch on the deep
arch, and two more multi-target patches: targets (2, 5, 9), and five targets (0, 2, 3, 6, 8)).
Models are trained once and cached as ONNX with a manifest (the ground truth, never shown to
the scan). Per model: truth, max deviation factor, flagged classes, verdict,
queries and seconds (per phase too); then false positives, false negatives and the smallest
gap between trojaned and benign max deviation factors. `--gradient both` scans each model
with pure query estimates (nes) and with the distilled surrogate, for the comparison.
Prints the tables, logs params/metrics/tables to MLflow and writes a markdown file.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

HELP = "DeepInspect (black-box) on a Fashion-MNIST zoo of benign and trojaned lab models"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str
    trigger: str
    targets: tuple
    seed: int


ZOO = (
    ZooEntry("benign-small-s0", "small", "none", (), 0),
    ZooEntry("benign-small-s1", "small", "none", (), 1),
    ZooEntry("benign-deep-s0", "deep", "none", (), 0),
    ZooEntry("patch-small", "small", "patch", (0,), 0),
    ZooEntry("pattern-small", "small", "pattern", (2,), 0),
    ZooEntry("blend-small", "small", "blend", (6,), 0),
    ZooEntry("multi-patch-small", "small", "patch", (1, 4, 7), 0),
    ZooEntry("patch-deep", "deep", "patch", (3,), 0),
    ZooEntry("multi-259-small", "small", "patch", (2, 5, 9), 1),
    ZooEntry("multi5-small", "small", "patch", (0, 2, 3, 6, 8), 2),
)


def add_arguments(parser):
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(e.name for e in ZOO))
    parser.add_argument("--quick", action="store_true", help="fewer generator steps and images per class")
    parser.add_argument("--gradient", choices=("nes", "surrogate", "both"), default="nes")
    parser.add_argument("--heldout", type=int, default=120, metavar="N",
                        help="N labelled Fashion-MNIST test images per class given to the scan, as a gate has "
                             "them: 20 per class form the substitute set (the paper's clean-data variant), the "
                             "rest train the reference models; 0 scans from model inversion alone")
    parser.add_argument("--references", type=int, default=3,
                        help="benign reference models for the normalised test (0: the paper's plain test)")
    parser.add_argument("--append", action="store_true", help="append the tables to --output instead of rewriting it")
    parser.add_argument("--seed", type=int, default=0, help="scan seed")
    parser.add_argument("--cutoff", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=6, help="lab training epochs")
    parser.add_argument("--train-limit", type=int, default=30000, help="training images per lab model")
    parser.add_argument("--zoo-dir", default="runs/zoo", help="cache of trained lab models")
    parser.add_argument("--output", default="benchmarks/deepinspect.md", help="markdown table to write")
    parser.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")
    parser.add_argument("--no-mlflow", action="store_true")


def _entries(models: str | None):
    if not models:
        return list(ZOO)
    by_name = {e.name: e for e in ZOO}
    unknown = [m for m in models.split(",") if m not in by_name]
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; choose from {sorted(by_name)}")
    return [by_name[m] for m in models.split(",")]


def build_zoo(entries, zoo_dir: Path, epochs: int, train_limit: int | None) -> dict:
    """Train (or load from the cache) every entry; returns name -> (onnx path, summary)."""
    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.lab import LabConfig, train_lab_model

    zoo_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = zoo_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    data = None
    out = {}
    for e in entries:
        cfg = LabConfig(arch=e.arch, trigger=e.trigger, targets=e.targets or (0,), epochs=epochs, seed=e.seed)
        key = {"arch": e.arch, "trigger": e.trigger, "targets": list(e.targets), "epochs": epochs,
               "seed": e.seed, "train_limit": train_limit}
        path = zoo_dir / f"{e.name}.onnx"
        if path.exists() and manifest.get(e.name, {}).get("key") == key:
            out[e.name] = (path, manifest[e.name]["summary"])
            continue
        if data is None:
            data = (load_fashion_mnist(True, limit=train_limit, seed=0), load_fashion_mnist(False))
        model = train_lab_model(data[0], data[1], cfg, progress=False)
        model.save(path)
        summary = model.summary()
        summary["targets"] = list(e.targets)
        manifest[e.name] = {"key": key, "summary": summary}
        manifest_path.write_text(json.dumps(manifest, indent=2))
        out[e.name] = (path, summary)
    return out


def clean_subset(per_class: int, seed: int = 0):
    """`per_class` Fashion-MNIST test images of every class (the clean-data variant's held-out set)."""
    import numpy as np

    from trojan_gate.gates.data import load_fashion_mnist

    test = load_fashion_mnist(False)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(test.y == c), per_class, replace=False)
                          for c in np.unique(test.y)])
    return test.subset(idx)


def scan_row(entry, path, summary, gradient, seed, cutoff, quick, heldout=None, references: int = 3) -> dict:
    from trojan_gate.gates.reference import reference_level
    from trojan_gate.gates.scan import scan

    overrides = {"gradient": gradient, "reference_models": references}
    if quick:
        overrides.update(generator_steps=150, n_per_class=10)
    if heldout is not None:
        overrides.update(heldout_mode="replace")
    t0 = time.perf_counter()
    r = scan(str(path), heldout=heldout, seed=seed, cutoff=cutoff, progress=False, **overrides)
    wall = time.perf_counter() - t0
    targets = list(entry.targets)
    flagged = list(r.flagged_classes)
    return {
        "model": entry.name, "arch": entry.arch, "trigger": entry.trigger, "targets": targets,
        "clean_acc": summary.get("clean_accuracy"), "asr": summary.get("attack_success_rate"),
        "gradient": gradient, "max_df": r.max_deviation_factor, "flagged": flagged, "verdict": r.verdict,
        "co_targets": list(r.co_targets),
        "target_df": [round(r.deviation_factors[t], 2) for t in targets],
        "targets_found": bool(targets) and set(targets) <= set(flagged),
        "any_target_found": bool(set(targets) & set(flagged)),
        "queries": r.queries, "seconds": wall,
        "phases": {k: {"queries": v["queries"], "seconds": v["seconds"]} for k, v in r.phases.items()},
        "reference_queries": (r.config.get("reference") or {}).get("queries", 0),
        "statistics": [round(s, 2) for s in r.statistics],
        "deviation_factors": [round(d, 2) for d in r.deviation_factors],
        "reference": None if r.reference_statistics is None else
        [round(float(v), 2) for v in reference_level(r.reference_statistics)],
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


def write_markdown(path: Path, args, results: dict):
    lines = ["---", ""] if args.append and path.exists() else [
             "# DeepInspect (black-box) on the Fashion-MNIST lab zoo", "",
             "Every number comes from the oracle's answers: the scan never reads weights or gradients. "
             "`max df` is the largest left-tail double-MAD deviation factor over the 10 classes; a model is "
             "flagged when it exceeds the cutoff c. `target df` is the deviation factor of each true target. "
             "`inv`, `gen`, `stat` are the inversion, generator and statistics phases (queries and wall seconds); "
             "`ref s` is the time spent training the reference models and measuring them (their queries go to "
             "local reference models, not to the scanned one, and are not in `queries`). "
             "Clean accuracy and attack success rate (ASR) are the lab's own measurements on the test set.", ""]
    lines += ["Generated by `trojan-gate benchmark deepinspect` "
             f"(`--seed {args.seed} --cutoff {args.cutoff} --epochs {args.epochs} --train-limit {args.train_limit}"
             f"{' --quick' if args.quick else ''} --gradient {args.gradient}"
             f" --heldout {args.heldout} --references {args.references}"
             f"{f' --models {args.models}' if args.models else ''}`) on {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()} with {os.cpu_count()} CPU cores visible"
             f"{f', {args.threads} threads' if args.threads else ''}; {hardware()}.", ""]
    for label, rows in results.items():
        s = summarise(rows)
        lines += [f"## {label}", "", table(rows), "", summary_lines(s), ""]
        lines += ["Per-class statistics (L1 of the smallest trigger reaching the success target), the reference "
                  "models' (geometric mean; the test runs on the log ratio) and deviation factors:",
                  "", "| model | statistics | reference | deviation factors |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['statistics']} | {r.get('reference') or '-'} | {r['deviation_factors']} |"
                  for r in rows]
        lines.append("")
    if len(results) == 2:
        a, b = (summarise(rows) for rows in results.values())
        lines += ["## nes vs surrogate", "", "| gradient | FP | FN | targets found | min gap | queries | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for g, s in zip(results, (a, b)):
            gap = s["min_gap_trojan_minus_benign_max_df"]
            lines.append(f"| {g} | {s['false_positives']} | {s['false_negatives']} | {s['targets_found']} | "
                         f"{'n/a' if gap is None else f'{gap:.2f}'} | {s['queries_total']:,} | {s['seconds_total']:.0f} |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if args.append and path.exists():
        text = path.read_text().rstrip("\n") + "\n\n" + text
    path.write_text(text)
    return text


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    entries = _entries(args.models)
    zoo = build_zoo(entries, Path(args.zoo_dir), args.epochs, args.train_limit)
    gradients = ("nes", "surrogate") if args.gradient == "both" else (args.gradient,)
    heldout = clean_subset(args.heldout) if args.heldout else None
    refs = args.references if heldout is not None else 0
    results = {}
    for gradient in gradients:
        label = (f"gradient = {gradient}, black-box (model inversion, no held-out data)" if heldout is None else
                 f"gradient = {gradient}, black-box with {args.heldout} held-out images per class "
                 f"(substitute set + {refs} reference models)")
        rows = []
        for e in entries:
            path, summary = zoo[e.name]
            row = scan_row(e, path, summary, gradient, args.seed, args.cutoff, args.quick, heldout, refs)
            print(f"[{gradient}] {e.name}: {row['verdict']} flagged {row['flagged']} max df {row['max_df']:.2f} "
                  f"targets {row['targets']} ({row['queries']:,} queries, {row['seconds']:.1f} s)", flush=True)
            rows.append(row)
        results[label] = rows
    text = write_markdown(Path(args.output), args, results)
    print(text)
    if not args.no_mlflow:
        _log_mlflow(args, results, text)
    return 0


def _log_mlflow(args, results, text):
    import mlflow

    with mlflow.start_run(run_name="benchmark-deepinspect"):
        mlflow.log_params({"seed": args.seed, "cutoff": args.cutoff, "gradient": args.gradient,
                           "heldout_per_class": args.heldout, "references": args.references, "quick": args.quick, "epochs": args.epochs,
                           "train_limit": args.train_limit, "hardware": hardware(),
                           "models": ",".join(r["model"] for r in next(iter(results.values())))})
        for rows in results.values():
            key = rows[0]["gradient"] + (f"_heldout_ref{args.references}" if args.heldout else "")
            s = summarise(rows)
            mlflow.log_metrics({f"{key}.{k}": float(v) for k, v in s.items() if v is not None})
            for r in rows:
                mlflow.log_metrics({f"{key}.{r['model']}.max_df": r["max_df"],
                                    f"{key}.{r['model']}.queries": r["queries"],
                                    f"{key}.{r['model']}.seconds": r["seconds"]})
            mlflow.log_dict({"rows": rows, "summary": s}, f"deepinspect_{key}.json")
        mlflow.log_text(text, "deepinspect.md")
