"""`trojan-gate benchmark patch --zoo vendor`: the gate's patch path on the detection benchmark's test zoo.

For each trojaned model of the vendor-like test zoo (`vendor_zoo`, trained apart from anything
the patch recipes were chosen on), the gate's own steps: the scan decision (`metascan.decision.
decide`: the task calibration decides, DeepInspect recovers the triggers beside it), a patch
with each recipe at each patch seed, the fresh decision on the patched model, the clean-accuracy
bound and the residual-risk evidence (`patching.acceptance`). The verdict is the gate's: patched
only when the fresh calibrated and paper tests are clean, accuracy drops at most
`--max-accuracy-drop` and the residual evidence accepts; blocked otherwise. The figures the gate
never sees are measured on the other half of the test split with the model's TRUE trigger:
attack success before and after, clean accuracy before and after with its paired standard error.

Every (model, recipe, patch seed, scan seed) row is appended to `--results` as it finishes, so a
stopped run resumes; a model whose rows are all there is not scanned again.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

RECIPES = {
    "paper": {"patch_fraction": 0.15, "epochs": 10, "distill_weight": 0.0, "trigger_jitter": 0,
              "background_fraction": 0.0, "soup": 1},
    "default": {},
    "universal": {"universal_rounds": 8},
    "reverse": {"reverse_rounds": 5},
}


def add_arguments(p, cache):
    p.add_argument("--recipes", default="default,universal", help=f"comma-separated, from {','.join(RECIPES)}")
    p.add_argument("--patch-seeds-zoo", default="0,1", metavar="SEEDS", help="patch seeds (vendor zoo)")
    p.add_argument("--calibration", default="benchmarks/detection-recipes-calibration",
                   help="the task's scan calibration (vendor zoo)")
    p.add_argument("--results", default=str(cache / "patch-zoo-results.jsonl"), help="resumable result cache")
    p.add_argument("--zoo-dir", default=str(cache / "vendor-zoo"), help="cache of the trained test zoo")
    p.add_argument("--paper-heldout", type=int, default=120, metavar="N",
                   help="held-out images per class DeepInspect gets (as in the detection benchmark)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01)
    p.add_argument("--patched-dir", default=str(cache / "patch-zoo-models"),
                   help="where every patched model is kept (by row key), to judge it again without patching")


def _measure(oracle, ev, trojan):
    from trojan_gate.gates.metascan.triggers import attack_success

    correct = oracle.predict(ev.x) == ev.y
    return correct, attack_success(oracle.predict, ev.x, ev.y, trojan, 10)


def run_vendor(args) -> int:
    from trojan_gate.gates import DeepInspect, ModelOracle, Patcher
    from trojan_gate.gates.hashing import sha256_file
    from trojan_gate.gates.metascan import load_calibration
    from trojan_gate.gates.metascan.decision import decide
    from trojan_gate.gates.patching import paired_drop_standard_error

    from .detection import read_results
    from .vendor_zoo import VENDOR_ZOO, build_vendor_zoo, heldout_split

    names = [n for n in args.models.split(",") if n]
    bad = [n for n in names if n not in VENDOR_ZOO or not VENDOR_ZOO[n].trojaned]
    if bad:
        raise ValueError(f"--models: not trojaned test-zoo models {bad}; choose from "
                         f"{sorted(n for n, e in VENDOR_ZOO.items() if e.trojaned)}")
    recipes = [r for r in args.recipes.split(",") if r]
    if set(recipes) - set(RECIPES):
        raise ValueError(f"--recipes: unknown {sorted(set(recipes) - set(RECIPES))}; choose from {list(RECIPES)}")
    seeds = [int(s) for s in args.patch_seeds_zoo.split(",") if s.strip()]
    heldout, ev = heldout_split()
    rng = np.random.default_rng(0)
    paper_heldout = heldout.subset(np.sort(np.concatenate([
        rng.choice(np.flatnonzero(heldout.y == c), args.paper_heldout, replace=False) for c in range(10)])))
    cal = load_calibration(args.calibration)
    zoo = build_vendor_zoo(names, args.zoo_dir)
    results = Path(args.results)
    cache = read_results(results)

    def scanner(oracle, _heldout):
        return DeepInspect(seed=args.seed, progress=False).scan(oracle, heldout=paper_heldout)

    for name in names:
        path, summary = zoo[name]
        sha = sha256_file(path)[:16]
        keys = {(rec, s): f"{name}|{sha}|{rec}|{s}|scan{args.seed}|{cal.sha256_[:16]}|residual2"
                for rec in recipes for s in seeds}
        todo = [k for k in keys if keys[k] not in cache]
        if not todo:
            continue
        oracle = ModelOracle(str(path))
        t0 = time.perf_counter()
        decision = decide(oracle, heldout, cal, scanner, paper_beside=True)
        scan_s = time.perf_counter() - t0
        correct0, asr0 = _measure(oracle, ev, summary["trojan"])
        base = {"model": name, "family": summary["family"], "arch": summary["arch"], "targets": summary["targets"],
                "flagged": decision.flagged_classes, "decision_flagged": decision.is_trojaned,
                "acc_before": float(correct0.mean()), "asr_before": asr0, "scan_s": round(scan_s, 1)}
        print(f"{name}: scan {'flagged ' + str(decision.flagged_classes) if decision.is_trojaned else 'clean'} "
              f"({scan_s:.0f} s), true ASR {asr0:.3f}", flush=True)
        for rec, s in todo:
            row = {**base, "key": keys[rec, s], "recipe": rec, "patch_seed": s}
            if not decision.is_trojaned or decision.paper is None:
                row.update(verdict="passed", reason="the scan did not flag the model")
            else:
                t1 = time.perf_counter()
                patcher = Patcher(seed=s, progress=False, **RECIPES[rec]).fit(
                    oracle.model_bytes, decision.paper.inverted_x, decision.paper.inverted_y,
                    decision.paper.generator.stamp, decision.flagged_classes, heldout=(heldout.x, heldout.y))
                patch = patcher.result_
                patch_s = time.perf_counter() - t1
                kept = Path(args.patched_dir) / f"{hashlib.sha256(row['key'].encode()).hexdigest()[:24]}.onnx"
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_bytes(patch.onnx_bytes)
                patched = ModelOracle(patch.onnx_bytes)
                fresh = decide(patched, heldout, cal, scanner, paper_beside=True)
                correct1, asr1 = _measure(patched, ev, summary["trojan"])
                drop_ok = patch.within_accuracy_drop(args.max_accuracy_drop)
                reasons = ([] if not fresh.is_trojaned else ["fresh calibrated scan flags"]) + \
                    ([] if not fresh.paper.is_trojaned else ["fresh paper scan flags"]) + \
                    ([] if drop_ok else ["accuracy drop over the bound"]) + \
                    ([] if patch.residual_accepted else ["residual evidence refuses"])
                row.update(verdict="patched" if not reasons else "blocked", reason="; ".join(reasons),
                           acc_after=float(correct1.mean()), asr_after=asr1,
                           acc_drop_se=paired_drop_standard_error(correct0, correct1),
                           gate_accuracy_drop=patch.accuracy_drop, residual=patch.residual.summary(),
                           residual_strongest=patch.residual.to_dict()["strongest"],
                           residual_accepted=patch.residual_accepted, residual_reasons=patch.residual.reasons,
                           fresh_calibrated=fresh.is_trojaned, fresh_paper=fresh.paper.is_trojaned,
                           patch_s=round(patch_s, 1), total_s=round(time.perf_counter() - t1, 1),
                           patched_file=kept.name, residual_areas=patch.residual.to_dict()["areas"],
                           reverse=getattr(patcher, "reverse_", None))
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            cache[row["key"]] = row
            print(f"  {rec} seed {s}: {row['verdict']} ({row.get('reason', '')}) ASR "
                  f"{row.get('asr_after', float('nan')):.3f} acc {row.get('acc_after', float('nan')):.3f}", flush=True)
    rows = [r for r in cache.values() if r["model"] in names and r["recipe"] in recipes and r["patch_seed"] in seeds]
    text = table(rows, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _top_anomaly(areas) -> str:
    """Rule (3)'s largest anomaly index and its class, '-' for rows judged before it existed."""
    from trojan_gate.gates.patching.acceptance import area_anomaly

    if not areas:
        return "-"
    ai = area_anomaly({int(t): v for t, v in areas.items()})
    top = max(ai, key=ai.get)
    return f"{ai[top]:.1f} ({top})"


def table(rows: list, args) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [f"# Patch benchmark on the vendor-like test zoo\n",
             f"Command: `trojan-gate benchmark patch --zoo vendor --models {args.models} --recipes {args.recipes} "
             f"--patch-seeds-zoo {args.patch_seeds_zoo} --seed {args.seed} --calibration {args.calibration}`. "
             "True-trigger attack success and clean accuracy on the 5,000 test images the gate never sees; "
             "verdict as the gate decides it (fresh calibrated and paper scans clean, accuracy drop <= "
             f"{args.max_accuracy_drop:g}, residual evidence accepted).\n",
             "| model | family | recipe | patch seed | flagged | ASR before | ASR after | acc before | acc change "
             "(± paired SE) | residual mask flagged / other / untargeted | smallest-area anomaly (class) | "
             "verdict | why | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["model"], r["recipe"], r["patch_seed"])):
        res = (r.get("residual") or {}).get("mask") or {}
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        change = "-" if "acc_after" not in r else \
            f"{100 * (r['acc_after'] - r['acc_before']):+.2f} (± {100 * (r['acc_drop_se'] or 0):.2f})"
        lines.append(f"| {r['model']} | {r['family']} | {r['recipe']} | {r['patch_seed']} | {r['flagged'] or '-'} | "
                     f"{pct(r['asr_before'])} | {pct(r.get('asr_after'))} | {100 * r['acc_before']:.1f}% | {change} | "
                     f"{f(res.get('max_flagged'))} / {f(res.get('max_unflagged'))} / {f(res.get('untargeted'))} | "
                     f"{_top_anomaly(r.get('residual_areas'))} | {r['verdict']} | {r.get('reason', '')} | {r.get('total_s', '-')} |")
    patched = [r for r in rows if r["verdict"] == "patched"]
    bad = [r for r in patched if r["asr_after"] > 0.10]
    ok = [r for r in patched if r["asr_after"] <= 0.05 and r["acc_before"] - r["acc_after"] <= 0.01 + 1e-9]
    lines += ["", f"Rows {len(rows)}; patched {len(patched)}, of which {len(ok)} with true-trigger ASR <= 5% and "
              f"accuracy at most 1 point lower; patched with true-trigger ASR > 10%: {len(bad)}."]
    return "\n".join(lines)
