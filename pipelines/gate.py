"""`trojan-gate gate models:/NAME/VERSION --heldout H.npz --policy block|patch [--alias candidate]`.

Exit codes for CI: 0 passed or patched, 1 blocked, 2 error (the gate failed closed).
"""
from __future__ import annotations

import json

HELP = "gate a registered version: scan, block or patch, attach STRIP, tag, move the alias (0 pass / 1 blocked / 2 error)"


def add_arguments(p):
    p.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--heldout", required=True, help="held-out labelled data (.npz or image folder)")
    p.add_argument("--policy", choices=["block", "patch"], default="block")
    p.add_argument("--alias", default="candidate", help="alias given to the version that passed (default candidate)")
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--n", type=int, default=None, help="STRIP N (default: chosen by estimated FAR among 5/10/20)")
    p.add_argument("--blend", default=None, help="STRIP superimposition rule (default: chosen by estimated FAR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=None, help="oracle query budget per scan")
    p.add_argument("--cutoff", type=float, default=2.0, help="deviation-factor cutoff c (default 2 ↔ α≈0.05)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="patched model may lose at most this much accuracy")
    p.add_argument("--min-per-class", type=int, default=5)
    p.add_argument("--timeout", type=float, default=None, help="seconds before the gate stops with verdict error")
    p.add_argument("--scan-without-heldout", action="store_true",
                   help="scan from model inversion alone, the paper's plain test (default: the held-out data "
                        "gives the scan its substitute set and benign reference models)")
    p.add_argument("--scan-option", action="append", default=[], metavar="KEY=JSON", help="extra scan() keyword")
    p.add_argument("--patch-option", action="append", default=[], metavar="KEY=JSON", help="extra ModelPatcher keyword")
    p.add_argument("--patch-rounds", type=int, default=1,
                   help="patch again against the fresh scan's triggers while it still flags, up to N rounds")
    p.add_argument("--force", action="store_true", help="re-run even if this config already decided the version")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def run(args) -> int:
    from trojan_gate.plugins.gate import GateConfig, run_gate
    from trojan_gate.plugins.registry import configure_tracking

    from .options import parse_options

    config = GateConfig(policy=args.policy, alias=args.alias, frr=args.frr, n_perturbations=args.n, blend=args.blend,
                        seed=args.seed, budget=args.budget, cutoff=args.cutoff,
                        max_accuracy_drop=args.max_accuracy_drop, min_per_class=args.min_per_class,
                        timeout_s=args.timeout, scan_uses_heldout=not args.scan_without_heldout,
                        scan_options=parse_options(args.scan_option, "--scan-option"),
                        patch_options=parse_options(args.patch_option, "--patch-option"),
                        patch_rounds=args.patch_rounds)  # a bad option stops here, before MLflow is touched
    configure_tracking(args.tracking_uri)
    outcome = run_gate(args.model_uri, args.heldout, config, force=args.force)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(outcome.report, f, indent=2, default=str)
    print(json.dumps(outcome.as_dict(), indent=2, default=str))
    return outcome.exit_code
