"""`trojan-gate benchmark patch`: patching and generator-estimated STRIP FAR on the lab's trojaned models.

For each trojaned Fashion-MNIST lab model: black-box DeepInspect scan → patch (fine-tune on
inverted data + part of the held-out set, stamped with the scan's generated triggers, labels
kept) → measure with the lab's TRUE trigger on the test split (never seen by the gate):
attack success rate and clean accuracy before/after, and a fresh scan of the patched
model. Then the gate's FAR estimate: STRIP calibrated on the (unpatched) trojaned model
at FRR 1% for each rule, FAR estimated with generated triggers next to the true FAR
measured with the real trigger.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HELP = "patch the lab's trojaned models and compare generator-estimated STRIP FAR with the true FAR"

DEFAULT_RECIPE = ("the defaults (40% stamped, 40 epochs, self-distillation weight 6, trigger jitter 2 px at 28x28, "
                  "15% background stamps of the unflagged classes, last epoch kept, a soup of 4 runs)")

ZOO = {
    "patch": dict(trigger="patch", targets=(0,)),
    "pattern": dict(trigger="pattern", targets=(2,)),
    "blend": dict(trigger="blend", targets=(5,)),
    "multi": dict(trigger="patch", targets=(1, 4, 7)),
}


def add_arguments(p):
    p.add_argument("--models", default=",".join(ZOO), help=f"subset of {','.join(ZOO)}")
    p.add_argument("--epochs", type=int, default=3, help="lab training epochs")
    p.add_argument("--arch", choices=["small", "deep"], default="small", help="lab architecture")
    p.add_argument("--heldout-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=2000, help="clean/stamped test images for the true figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--out", default="benchmarks/patch.md")
    p.add_argument("--patch-option", action="append", default=[], metavar="KEY=JSON",
                   help="ModelPatcher keyword, e.g. epochs=20 (repeatable; "
                        + DEFAULT_RECIPE.replace("%", "%%") + ")")  # argparse %-formats help
    p.add_argument("--patch-rounds", type=int, default=1,
                   help="patch again against the fresh scan's triggers while it still flags, up to this many rounds")
    p.add_argument("--scan-without-heldout", action="store_true",
                   help="scan from model inversion alone (default: held-out substitute set + reference models, "
                        "as the gate scans)")
    p.add_argument("--patch-seeds", default="",
                   help="extra ModelPatcher seeds (comma-separated) patched once more against the same scan, "
                        "for the spread of accuracy change and true-trigger ASR (no fresh scans)")
    p.add_argument("--no-mlflow", action="store_true")


def _acc(oracle, x, y) -> float:
    return float(_correct(oracle, x, y).mean())


def _correct(oracle, x, y) -> np.ndarray:
    return oracle.predict(x) == y


def _asr(oracle, lab, x, y, targets) -> float:
    keep = ~np.isin(y, targets)
    return float(np.isin(oracle.predict(lab.stamp(x[keep])), targets).mean())


def _se(se) -> str:
    return "" if se is None else f" (± {100 * se:.2f} pt)"


def run(args) -> int:
    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.far_estimate import estimate_far, hijacking_inputs
    from trojan_gate.gates.lab import LabConfig, train_lab_model
    from trojan_gate.gates.oracle import ModelOracle
    from trojan_gate.gates.patching import ModelPatcher, paired_drop_standard_error, patch_in_rounds
    from trojan_gate.gates.scan import scan
    from trojan_gate.gates.strip import BLEND_RULES, StripDetector

    from trojan_gate.plugins.gate import check_option_names

    from .options import parse_options

    patch_options = parse_options(args.patch_option, "--patch-option")
    # an unknown option fails here, before any training; --seed and --patch-seeds set the seeds
    check_option_names("--patch-option", patch_options, lambda: set(ModelPatcher.param_names()) - {"seed"})
    extra_seeds = [int(v) for v in args.patch_seeds.split(",") if v.strip()]
    train, test = load_fashion_mnist(True, download=True), load_fashion_mnist(False, download=True)
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(test))
    held = test.subset(idx[:args.heldout_size])
    ev = test.subset(idx[args.heldout_size:args.heldout_size + args.test_size])
    patch_rows, far_rows = [], []
    for name in args.models.split(","):
        spec = ZOO[name]
        lab = train_lab_model(train, test, LabConfig(arch=args.arch, seed=args.seed, epochs=args.epochs, **spec))
        targets = list(spec["targets"])
        oracle = ModelOracle(lab.onnx_bytes)
        t0 = time.perf_counter()
        scan_held = None if args.scan_without_heldout else held
        result = scan(oracle, heldout=scan_held, seed=args.seed)
        scan_s = time.perf_counter() - t0
        correct_before = _correct(oracle, ev.x, ev.y)
        row = {"model": name, "targets": targets, "flagged": result.flagged_classes,
               "df_before": result.max_deviation_factor, "acc_before": float(correct_before.mean()),
               "asr_before": _asr(oracle, lab, ev.x, ev.y, targets), "scan_s": scan_s}
        if result.trojan_suspected:
            t1 = time.perf_counter()
            results, scans = patch_in_rounds(  # no accuracy bound: every round is measured
                oracle.model_bytes, result, lambda b: scan(ModelOracle(b), heldout=scan_held, seed=args.seed),
                (held.x, held.y), args.patch_rounds, seed=args.seed, **patch_options)
            rounds = []
            for pr, fresh in zip(results, scans):
                patched = ModelOracle(pr.onnx_bytes)
                correct_after = _correct(patched, ev.x, ev.y)
                rounds.append({"asr": _asr(patched, lab, ev.x, ev.y, targets), "acc": float(correct_after.mean()),
                               "df": fresh.max_deviation_factor, "flagged": fresh.flagged_classes})
            row.update(acc_after=rounds[-1]["acc"], asr_after=rounds[-1]["asr"],
                       acc_drop_se=paired_drop_standard_error(correct_before, correct_after),
                       df_after=scans[-1].max_deviation_factor, fresh_verdict=scans[-1].verdict,
                       rounds=rounds, patch_s=time.perf_counter() - t1)
            spread = [{"seed": args.seed, "acc": rounds[0]["acc"], "asr": rounds[0]["asr"]}]
            for s in extra_seeds:
                pr = ModelPatcher(seed=s, **patch_options).fit(
                    oracle.model_bytes, result.inverted_x, result.inverted_y, result.generator.stamp,
                    result.flagged_classes, heldout=(held.x, held.y))
                patched = ModelOracle(pr.onnx_bytes)
                spread.append({"seed": s, "acc": _acc(patched, ev.x, ev.y),
                               "asr": _asr(patched, lab, ev.x, ev.y, targets)})
            row["seed_spread"] = spread
        patch_rows.append(row)
        # generator-estimated vs true STRIP FAR on the trojaned model itself
        stamped_all = hijacking_inputs(oracle, result.generator.stamp, held.x, held.y, seed=args.seed)
        flagged = result.flagged_classes or None
        stamped_flagged = (hijacking_inputs(oracle, result.generator.stamp, held.x, held.y, seed=args.seed,
                                            classes=flagged) if flagged else None)
        keep = ~np.isin(ev.y, targets)
        true_in = lab.stamp(ev.x[keep])
        true_in = true_in[np.isin(oracle.predict(true_in), targets)]
        for blend in BLEND_RULES:
            det = StripDetector(oracle, n_perturbations=10, blend=blend, seed=args.seed, progress=False)
            det.fit(held.x).infer_threshold(frr=args.frr)
            far_rows.append({"model": name, "blend": blend,
                             "estimated_far": estimate_far(det, stamped_flagged) if flagged else None,
                             "estimated_far_all": estimate_far(det, stamped_all),
                             "true_far": float((det.score(true_in) > det.threshold_).mean()),
                             "n_estimate": int(len(stamped_flagged.x)) if flagged else 0,
                             "n_true": int(len(true_in))})
        print(json.dumps(row, default=float), flush=True)

    def f(v, pct=False):
        if v is None:
            return "–"
        return f"{100 * v:.1f}%" if pct else f"{v:.2f}"

    lines = [f"Lab architecture: {args.arch}. Scans: "
             f"{'model inversion alone' if args.scan_without_heldout else 'held-out substitute set + 3 reference models'}."
             f" Patch options: {patch_options or DEFAULT_RECIPE}."
             f" Patch rounds: at most {args.patch_rounds}.", "",
             "| model | targets | flagged | max df before → after | clean acc before → after (± paired SE of the "
             f"change, {len(ev.y)} images) | true-trigger ASR before → after | fresh scan | scan s | patch s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in patch_rows:
        lines.append(f"| {r['model']} | {r['targets']} | {r['flagged']} | {f(r['df_before'])} → {f(r.get('df_after'))} | "
                     f"{f(r['acc_before'], True)} → {f(r.get('acc_after'), True)}{_se(r.get('acc_drop_se'))} | "
                     f"{f(r['asr_before'], True)} → "
                     f"{f(r.get('asr_after'), True)} | {r.get('fresh_verdict', 'not patched')} | {r['scan_s']:.0f} | "
                     f"{r.get('patch_s', 0):.0f} |")
    lines += ["", f"STRIP at preset FRR {args.frr:.0%}, N=10, on the unpatched trojaned models:", "",
              "| model | blend | estimated FAR (flagged classes' generated triggers) | estimated FAR (all classes) "
              "| true FAR (lab trigger) | n est. | n true |",
              "|---|---|---|---|---|---|---|"]
    for r in far_rows:
        lines.append(f"| {r['model']} | {r['blend']} | {f(r['estimated_far'], True)} | "
                     f"{f(r['estimated_far_all'], True)} | {f(r['true_far'], True)} | {r['n_estimate']} | {r['n_true']} |")
    table = "\n".join(lines)
    rounds_text = ""
    if any(len(r.get("rounds", [])) > 1 for r in patch_rows):
        rl = ["", "", "Per patch round (true-trigger ASR, clean accuracy, fresh scan):", "",
              "| model | round | ASR | clean acc | max df | flagged |", "|---|---|---|---|---|---|"]
        for r in patch_rows:
            for i, rd in enumerate(r.get("rounds", []), 1):
                rl.append(f"| {r['model']} | {i} | {f(rd['asr'], True)} | {f(rd['acc'], True)} | {f(rd['df'])} | "
                          f"{rd['flagged']} |")
        rounds_text = "\n".join(rl)
        print(rounds_text)
    if extra_seeds:
        sl = ["", "", f"Seed spread: ModelPatcher seeds {args.seed} (the table above, first round) and "
              f"{', '.join(map(str, extra_seeds))}, each against the same scan; accuracy change in points and "
              "true-trigger ASR after patching, on the same test images (no fresh scans):", "",
              "| model | " + " | ".join(f"seed {s}" for s in [args.seed, *extra_seeds]) + " | mean |",
              "|---|" + "---|" * (len(extra_seeds) + 2)]
        for r in patch_rows:
            if "seed_spread" not in r:
                continue
            cells = [f"{100 * (d['acc'] - r['acc_before']):+.2f} / {100 * d['asr']:.1f}%" for d in r["seed_spread"]]
            mean_acc = np.mean([d["acc"] for d in r["seed_spread"]]) - r["acc_before"]
            mean_asr = np.mean([d["asr"] for d in r["seed_spread"]])
            sl.append(f"| {r['model']} | " + " | ".join(cells) + f" | {100 * mean_acc:+.2f} / {100 * mean_asr:.1f}% |")
        rounds_text += "\n".join(sl)
        print("\n".join(sl))
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Patch benchmark\n\nCommand: `trojan-gate benchmark patch --models {args.models}"
                   f" --arch {args.arch} --epochs {args.epochs} --seed {args.seed}"
                   f"{' --scan-without-heldout' if args.scan_without_heldout else ''}"
                   f"{''.join(' --patch-option ' + o for o in args.patch_option)}"
                   f"{f' --patch-rounds {args.patch_rounds}' if args.patch_rounds != 1 else ''}"
                   f"{f' --patch-seeds {args.patch_seeds}' if extra_seeds else ''}`\n\n{table}{rounds_text}\n")
    if not args.no_mlflow:
        import mlflow

        from trojan_gate.plugins.registry import configure_tracking, ensure_experiment

        configure_tracking(None)
        ensure_experiment("trojan-gate-benchmarks")
        with mlflow.start_run(run_name="benchmark-patch"):
            mlflow.log_params({"models": args.models, "epochs": args.epochs, "seed": args.seed, "frr": args.frr,
                               "scan_uses_heldout": not args.scan_without_heldout,
                               "patch_options": json.dumps(patch_options)})
            for r in patch_rows:
                for k in ("asr_before", "asr_after", "acc_before", "acc_after", "df_before", "df_after"):
                    if r.get(k) is not None:
                        mlflow.log_metric(f"{r['model']}_{k}", float(r[k]))
            mlflow.log_text(table, "patch_benchmark.md")
    return 0
