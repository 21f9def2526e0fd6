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

from .zoo import PATCH_MODELS, ZOO, lab_config

HELP = "patch the lab's trojaned models and compare generator-estimated STRIP FAR with the true FAR"

def _default_recipe() -> str:
    from trojan_gate.gates import Patcher

    p = Patcher().get_params()
    return (f"the defaults ({p['patch_fraction']:.0%} stamped, {p['epochs']} epochs, self-distillation weight "
            f"{p['distill_weight']:g}, trigger jitter 2 px at 28x28, {p['background_fraction']:.0%} background "
            f"stamps of the unflagged classes, last epoch kept, a soup of {p['soup']} runs)")

def add_arguments(p):
    from trojan_gate.gates.data import default_cache_dir

    from . import patch_zoo

    p.add_argument("--zoo", choices=["lab", "vendor"], default="lab",
                   help="lab: the lab's trojans with the STRIP FAR estimate; vendor: the detection benchmark's "
                        "test zoo through the gate's patch path (patch_zoo)")
    p.add_argument("--models", default=None,
                   help=f"lab: subset of {','.join(PATCH_MODELS)}; vendor: trojaned test-zoo entries")
    p.add_argument("--epochs", type=int, default=3, help="lab training epochs")
    p.add_argument("--arch", choices=["small", "deep"], default="small", help="lab architecture")
    p.add_argument("--heldout-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=2000, help="clean/stamped test images for the true figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    p.add_argument("--patch-option", action="append", default=[], metavar="KEY=JSON",
                   help="Patcher keyword, e.g. epochs=20 (repeatable; "
                        + _default_recipe().replace("%", "%%") + ")")  # argparse %-formats help
    p.add_argument("--scan-without-heldout", action="store_true",
                   help="scan from model inversion alone (default: held-out substitute set + reference models, "
                        "as the gate scans)")
    p.add_argument("--patch-seeds", default="",
                   help="extra Patcher seeds (comma-separated) patched once more against the same scan, "
                        "for the spread of accuracy change and true-trigger ASR (no fresh scans)")
    p.add_argument("--no-mlflow", action="store_true")
    patch_zoo.add_arguments(p, default_cache_dir())


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
    if args.zoo == "vendor":
        from .patch_zoo import run_vendor

        return run_vendor(args)
    args.models = args.models or ",".join(PATCH_MODELS)
    from trojan_gate.gates import DeepInspect, ModelOracle, Patcher, Strip
    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.lab import train_lab_model
    from trojan_gate.gates.patching import paired_drop_standard_error
    from trojan_gate.gates.strip import BLEND_RULES
    from trojan_gate.gates.far_estimate import estimate_far, hijacking_inputs
    from trojan_gate.plugins.gate.config import ConfigError, patcher_names

    from ..options import parse_options

    patch_options = parse_options(args.patch_option, "--patch-option")
    # an unknown option fails here, before any training; --seed and --patch-seeds set the seeds
    unknown = sorted(set(patch_options) - (set(patcher_names()) - {"seed"}))
    if unknown:
        raise ConfigError(f"--patch-option: unknown option(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(n for n in patcher_names() if n not in ('seed', 'progress'))}")
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in PATCH_MODELS]
    if bad:
        raise ConfigError(f"--models: unknown model(s) {bad}; choose from {list(PATCH_MODELS)}")
    extra_seeds = [int(v) for v in args.patch_seeds.split(",") if v.strip()]
    train, test = load_fashion_mnist(True, download=True), load_fashion_mnist(False, download=True)
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(test))
    held = test.subset(idx[:args.heldout_size])
    ev = test.subset(idx[args.heldout_size:args.heldout_size + args.test_size])
    scan_held = None if args.scan_without_heldout else held
    scanner = DeepInspect(seed=args.seed, progress=True)
    patch_rows, far_rows = [], []
    for name in names:
        entry = ZOO[PATCH_MODELS[name]]
        lab = train_lab_model(train, test, lab_config(entry, args.epochs, arch=args.arch, seed=args.seed))
        targets = list(entry.targets)
        oracle = ModelOracle(lab.onnx_bytes)
        t0 = time.perf_counter()
        result = scanner.scan(oracle, heldout=scan_held)
        scan_s = time.perf_counter() - t0
        correct_before = _correct(oracle, ev.x, ev.y)
        row = {"model": name, "targets": targets, "flagged": result.flagged_classes,
               "df_before": result.instance_score, "acc_before": float(correct_before.mean()),
               "asr_before": _asr(oracle, lab, ev.x, ev.y, targets), "scan_s": scan_s}
        if result.is_trojaned:
            t1 = time.perf_counter()
            pr = Patcher(seed=args.seed, **patch_options).patch(oracle, result, heldout=(held.x, held.y))
            fresh = scanner.scan(ModelOracle(pr.onnx_bytes), heldout=scan_held)
            patched = ModelOracle(pr.onnx_bytes)
            correct_after = _correct(patched, ev.x, ev.y)
            row.update(acc_after=float(correct_after.mean()), asr_after=_asr(patched, lab, ev.x, ev.y, targets),
                       acc_drop_se=paired_drop_standard_error(correct_before, correct_after),
                       df_after=fresh.instance_score, fresh_verdict="trojaned" if fresh.is_trojaned else "clean",
                       patch_s=time.perf_counter() - t1)
            spread = [{"seed": args.seed, "acc": row["acc_after"], "asr": row["asr_after"]}]
            for s in extra_seeds:
                patched = ModelOracle(Patcher(seed=s, **patch_options).patch(oracle, result,
                                                                             heldout=(held.x, held.y)).onnx_bytes)
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
            det = Strip(oracle, n_perturbations=10, blend=blend, seed=args.seed, progress=False)
            det.fit(held.x).infer_threshold(frr=args.frr)
            far_rows.append({"model": name, "blend": blend,
                             "estimated_far": estimate_far(det, stamped_flagged) if flagged else None,
                             "estimated_far_all": estimate_far(det, stamped_all),
                             "true_far": float((det.score(true_in) < det.threshold_).mean()),
                             "n_estimate": int(len(stamped_flagged.x)) if flagged else 0,
                             "n_true": int(len(true_in))})
        print(json.dumps(row, default=float), flush=True)

    def f(v, pct=False):
        if v is None:
            return "–"
        return f"{100 * v:.1f}%" if pct else f"{v:.2f}"

    lines = [f"Lab architecture: {args.arch}. Scans: "
             f"{'model inversion alone' if args.scan_without_heldout else 'held-out substitute set + 3 reference models'}."
             f" Patch options: {patch_options or _default_recipe()}.", "",
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
    if extra_seeds:
        sl = ["", "", f"Seed spread: Patcher seeds {args.seed} (the table above) and "
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
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# Patch benchmark\n\nCommand: `trojan-gate benchmark patch --models {args.models}"
                       f" --arch {args.arch} --epochs {args.epochs} --seed {args.seed}"
                       f"{' --scan-without-heldout' if args.scan_without_heldout else ''}"
                       f"{''.join(' --patch-option ' + o for o in args.patch_option)}"
                       f"{f' --patch-seeds {args.patch_seeds}' if extra_seeds else ''}`\n\n{table}{rounds_text}\n")
    if not args.no_mlflow:
        import mlflow

        from trojan_gate.plugins.registry import configure_tracking, ensure_experiment

        configure_tracking(None)
        ensure_experiment("trojan-gate-benchmarks")
        with mlflow.start_run(run_name="benchmark-patch"):
            mlflow.log_params({"models": args.models, "epochs": args.epochs, "seed": args.seed, "frr": args.frr,
                               "use_heldout": not args.scan_without_heldout,
                               "patch_options": json.dumps(patch_options)})
            for r in patch_rows:
                for k in ("asr_before", "asr_after", "acc_before", "acc_after", "df_before", "df_after"):
                    if r.get(k) is not None:
                        mlflow.log_metric(f"{r['model']}_{k}", float(r[k]))
            mlflow.log_text(table, "patch_benchmark.md")
    return 0
