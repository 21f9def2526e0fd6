"""`trojan-gate benchmark detection`: the calibrated scan decision against the paper's, on a test zoo trained apart.

The calibration is built from the defender's 5,000 held-out Fashion-MNIST test images alone
(`vendor_zoo.heldout_split`), with the held-out trigger family (`--hold-out`, default the sparse
pattern) left out of its shadow pool. The test zoo (`vendor_zoo`) is trained the way a vendor
would: the full training split, other seeds, the small and the 6-conv architecture, plus an
architecture no shadow has (``lenet``). Per model and scan seed the benchmark records the
calibrated decision and, with `--paper`, the gate's DeepInspect scan with its double-MAD test;
every (model, seed, decision) result is cached in `--results` (JSON lines) under the model's
sha256, the calibration's sha256 and the scan settings, so a stopped run resumes. The table:
ROC AUC of the scores, false blocks, misses and targets among the flagged at the operating
point, verdict stability across seeds, per family and per architecture.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .vendor_zoo import HELD_OUT_FAMILY, VENDOR_ZOO, build_vendor_zoo, heldout_split

HELP = "the calibrated scan decision and the paper's double-MAD test on a vendor-like test zoo"


def add_arguments(parser):
    from trojan_gate.gates.data import default_cache_dir

    cache = default_cache_dir()
    parser.add_argument("--models", default=",".join(VENDOR_ZOO), help="comma-separated test-zoo entries")
    parser.add_argument("--zoo-dir", default=str(cache / "vendor-zoo"), help="cache of the trained test zoo")
    parser.add_argument("--calibration", default=str(cache / "detection-calibration"),
                        help="the task calibration's directory (built there with --shadows when absent)")
    parser.add_argument("--shadow-cache", default=str(cache / "shadows"), help="cache of trained shadow models")
    parser.add_argument("--shadows", type=int, default=400, help="shadow models when the calibration is built")
    parser.add_argument("--architectures", default="small,deep",
                        help="shadow architectures when the calibration is built (small,deep,resnet,allconv,mlp: "
                             "the wide pool); lenet is refused, it is the benchmark's unseen architecture")
    parser.add_argument("--hold-out", default=HELD_OUT_FAMILY, help="trigger family kept out of the calibration")
    parser.add_argument("--seeds", default="0,1,2", help="scan seeds")
    parser.add_argument("--paper", action="store_true", help="also run the gate's DeepInspect scan (double-MAD)")
    parser.add_argument("--paper-heldout", type=int, default=120, metavar="N",
                        help="held-out images per class the paper's scan gets (substitute set + reference models; "
                             "120 as in benchmarks/deepinspect.md, drawn from the defender's 5,000)")
    parser.add_argument("--results", default=str(cache / "detection-results.jsonl"), help="resumable result cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=None, help="also write the markdown tables here")
    parser.add_argument("--no-mlflow", action="store_true")


def roc_auc(benign_scores, trojan_scores) -> float:
    """P(trojaned score > benign score) + P(tie) / 2 (the Mann-Whitney form of ROC AUC)."""
    b = np.asarray(benign_scores, np.float64)[:, None]
    t = np.asarray(trojan_scores, np.float64)[None, :]
    return float(((t > b).mean() + 0.5 * (t == b).mean())) if b.size and t.size else float("nan")


def read_results(path: Path) -> dict:
    """A resumable benchmark's rows by key, read from its JSON-lines cache ({} when absent)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["key"]] = r
    return out


def _append(path: Path, row: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def calibration_for(args, heldout):
    """Load the calibration in `--calibration`, or build it (resumable through the shadow cache)."""
    from trojan_gate.gates.metascan import ScanCalibration, load_calibration, save_calibration
    from trojan_gate.gates.metascan.triggers import FAMILIES

    directory = Path(args.calibration)
    if (directory / "calibration.json").exists():
        return load_calibration(directory)
    families = [f for f in FAMILIES if f != args.hold_out]
    archs = [a for a in args.architectures.split(",") if a]
    if "lenet" in archs or not archs:
        raise ValueError(f"--architectures {args.architectures!r}: name at least one, and not lenet (the benchmark's "
                         "architecture no shadow has)")
    cal = ScanCalibration(n_shadows=args.shadows, families=families, architectures=archs,
                          cache_dir=args.shadow_cache).fit(heldout)
    save_calibration(cal, directory)
    return load_calibration(directory)


def evaluate(args) -> list:
    from trojan_gate.gates import DeepInspect, ModelOracle
    from trojan_gate.gates.hashing import sha256_file

    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(VENDOR_ZOO))
    if unknown:
        raise ValueError(f"unknown test-zoo model(s) {unknown}; choose from {sorted(VENDOR_ZOO)}")
    heldout, _ = heldout_split()
    rng = np.random.default_rng(0)
    paper_heldout = heldout.subset(np.sort(np.concatenate([
        rng.choice(np.flatnonzero(heldout.y == c), args.paper_heldout, replace=False) for c in range(10)])))
    zoo = build_vendor_zoo(names, args.zoo_dir)
    cal = calibration_for(args, heldout)
    seeds = [int(s) for s in args.seeds.split(",")]
    results_path = Path(args.results)
    cache = read_results(results_path)
    rows = []
    for name in names:
        path, summary = zoo[name]
        sha = sha256_file(path)
        for seed in seeds:
            decisions = ["calibrated"] + (["paper"] if args.paper else [])
            for decision in decisions:
                key = f"{name}|{sha[:16]}|{decision}|{seed}|" + (cal.sha256_[:16] if decision == "calibrated" else
                                                                 f"gate-scan-default-{args.paper_heldout}")
                if key not in cache:
                    t0 = time.perf_counter()
                    oracle = ModelOracle(str(path))
                    if decision == "calibrated":
                        v = cal.decide(oracle, heldout)
                        res = {"is_trojaned": v.is_trojaned, "score": v.instance_score, "flagged": v.flagged_classes,
                               "false_block_probability": v.false_block_probability, "queries": v.queries,
                               **{k: v.extra[k] for k in ("target_rule", "margin_z") if k in v.extra}}
                    else:
                        r = DeepInspect(seed=seed, progress=False).scan(oracle, heldout=paper_heldout)
                        res = {"is_trojaned": r.is_trojaned, "score": r.instance_score, "flagged": r.flagged_classes,
                               "queries": r.queries}
                    res.update(key=key, model=name, decision=decision, seed=seed,
                               seconds=round(time.perf_counter() - t0, 2))
                    _append(results_path, res)
                    cache[key] = res
                    print(f"{name} seed {seed} {decision}: {'trojaned' if res['is_trojaned'] else 'clean'} "
                          f"{res['flagged']} score {res['score']:.2f} ({res['seconds']:.1f} s)", flush=True)
                rows.append({**cache[key], "summary": summary})
    return rows, cal


def summarise(rows: list, decision: str, seeds: list, select=lambda s: True) -> dict:
    rows = [r for r in rows if r["decision"] == decision and select(r["summary"])]
    if not rows:
        return {}
    models = sorted({r["model"] for r in rows})
    by_model = {m: [r for r in rows if r["model"] == m] for m in models}
    benign = [m for m in models if not by_model[m][0]["summary"]["targets"]]
    trojan = [m for m in models if by_model[m][0]["summary"]["targets"]]
    per_seed = []
    for seed in seeds:
        rs = {r["model"]: r for r in rows if r["seed"] == seed}
        fb = [rs[m]["is_trojaned"] for m in benign if m in rs]
        hit = [rs[m]["is_trojaned"] for m in trojan if m in rs]
        tgt = [rs[m]["is_trojaned"] and set(rs[m]["summary"]["targets"]) <= set(rs[m]["flagged"])
               for m in trojan if m in rs]
        auc = roc_auc([rs[m]["score"] for m in benign if m in rs], [rs[m]["score"] for m in trojan if m in rs])
        width = [len(rs[m]["flagged"]) for m in trojan if m in rs and rs[m]["is_trojaned"]]
        per_seed.append({"seed": seed, "false_blocks": int(sum(fb)), "benign": len(fb), "flagged": int(sum(hit)),
                         "trojaned": len(hit), "targets": int(sum(tgt)), "auc": auc,
                         "classes_flagged": float(np.median(width)) if width else None})
    stable = [len({(r["is_trojaned"], tuple(r["flagged"])) for r in by_model[m]}) == 1 for m in models]
    return {"per_seed": per_seed, "stable": int(sum(stable)), "models": len(models),
            "seconds_mean": float(np.mean([r["seconds"] for r in rows]))}


def _pct(a, b) -> str:
    return f"{a}/{b} ({100 * a / b:.0f}%)" if b else "-"


def tables(rows: list, seeds: list, decisions: list) -> str:
    def vendor(s):
        return s.get("recipe", "vendor") == "vendor"

    groups = [("all (small, 6-conv)", lambda s: s["arch"] != "lenet" and vendor(s)),
              ("6-conv only", lambda s: s["arch"] == "deep" and vendor(s)),
              ("held-out family only", lambda s: s["family"] in ("none", HELD_OUT_FAMILY) and s["arch"] != "lenet"
               and vendor(s)),
              ("unseen architecture (lenet)", lambda s: s["arch"] == "lenet"),
              ("unseen recipe (small, SGD step 256)", lambda s: not vendor(s))]
    lines = ["| decision | models | seed | ROC AUC | false blocks | trojaned flagged | all targets among flagged | "
             "classes flagged (median per flagged trojan) | verdicts identical across seeds | s / scan |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for decision in decisions:
        for label, select in groups:
            s = summarise(rows, decision, seeds, select)
            for p in s.get("per_seed", []):
                width = "-" if p["classes_flagged"] is None else f"{p['classes_flagged']:g}"
                lines.append(f"| {decision} | {label} | {p['seed']} | {p['auc']:.3f} | "
                             f"{_pct(p['false_blocks'], p['benign'])} | {_pct(p['flagged'], p['trojaned'])} | "
                             f"{_pct(p['targets'], p['trojaned'])} | "
                             f"{width} | "
                             f"{_pct(s['stable'], s['models'])} | "
                             f"{s['seconds_mean']:.1f} |")
    lines += ["", "| model | arch | family | targets | clean acc | ASR | decision | seed | score | "
              "false-block prob. | flagged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["summary"]["family"], r["model"], r["decision"], r["seed"])):
        s = r["summary"]
        fbp = r.get("false_block_probability")
        asr = "-" if s["attack_success"] is None else f"{s['attack_success']:.3f}"
        lines.append(f"| {r['model']} | {s['arch']} | {s['family']} | {s['targets'] or '-'} | "
                     f"{s['clean_accuracy']:.3f} | {asr} | {r['decision']} | {r['seed']} | {r['score']:.2f} | "
                     f"{'-' if fbp is None else f'{fbp:.3f}'} | {r['flagged'] or '-'} |")
    return "\n".join(lines)


def _target_rule(cal) -> str:
    if getattr(cal, "margin_null_", None) is None:
        return "the meta-classifier's class p-values"
    return (f"reachable margins against {cal.margin_shadows} benign shadows (class threshold "
            f"{cal.margin_threshold_:.2f})")


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows, cal = evaluate(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    decisions = ["calibrated"] + (["paper"] if args.paper else [])
    head = ["# Scan decisions on the vendor-like test zoo", "",
            f"Generated by `trojan-gate benchmark detection --calibration {args.calibration} --results {args.results} "
            f"--shadows {args.shadows} --architectures {args.architectures} --seeds {args.seeds}{' --paper' if args.paper else ''}"
            f" --paper-heldout {args.paper_heldout} --hold-out {args.hold_out}"
            f"{'' if args.models == ','.join(VENDOR_ZOO) else ' --models ' + args.models}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} with "
            f"{os.cpu_count()} CPU cores. Calibration {cal.sha256_[:16]}: {cal.pool_['kept']} shadows kept of "
            f"{cal.pool_['requested']} ({cal.pool_['benign']} benign, {cal.pool_['trojaned']} trojaned; families "
            f"{', '.join(cal.pool_['families'])}; architectures "
            f"{', '.join(cal.pool_.get('architectures', ['small', 'deep']))}), "
            f"threshold {cal.threshold_:.3f} at false-block rate "
            f"{cal.false_block_rate:g}; power on the trojaned calibration shadows {cal.power_}. A flagged model's "
            f"targets are named by {_target_rule(cal)}. The calibrated "
            "decision has no random draw at scan time: its rows repeat across scan seeds by construction.", "", ""]
    text = "\n".join(head) + tables(rows, seeds, decisions) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if not args.no_mlflow:
        import mlflow

        with mlflow.start_run(run_name="benchmark-detection"):
            mlflow.log_params({"seeds": args.seeds, "paper": args.paper, "hold_out": args.hold_out,
                               "calibration_sha256": cal.sha256_, "models": len({r["model"] for r in rows})})
            mlflow.log_dict({"rows": rows}, "detection.json")
            mlflow.log_text(text, "detection.md")
    return 0
