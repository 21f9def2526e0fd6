"""`trojan-gate gate models:/NAME/VERSION --heldout H.npz [--config trojan-gate.toml] [flags]`.

Settings come from the TOML settings file first; each flag given on the command line overrides
its key. Exit codes for CI: 0 passed or patched, 1 blocked, 2 error (the gate failed closed, or
a setting is wrong: a misspelt key exits 2 naming it before MLflow is touched).
"""
from __future__ import annotations

import json
import signal
import time

from . import keys

HELP = "gate a registered version: scan, block or patch, attach STRIP, tag, move the alias (0 pass / 1 blocked / 2 error)"

# flag -> (section, key) in the settings file
FLAG_KEYS = {"policy": ("gate", "policy"), "alias": ("gate", "alias"), "seed": ("gate", "seed"),
             "max_accuracy_drop": ("gate", "max_accuracy_drop"), "min_per_class": ("gate", "min_per_class"),
             "timeout": ("gate", "timeout_s"), "budget": ("scan", "budget"), "cutoff": ("scan", "cutoff"),
             "frr": ("check", "frr"), "n": ("check", "n_perturbations"), "blend": ("check", "blend")}


def add_arguments(p):
    p.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--heldout", required=True, help="held-out labelled data (.npz or image folder)")
    p.add_argument("--config", help="settings file (TOML, sections gate / scan / patch / check; see README)")
    p.add_argument("--policy", choices=["block", "patch"], default=None, help="default block")
    p.add_argument("--alias", default=None, help="alias given to the version that passed (default candidate)")
    p.add_argument("--frr", type=float, default=None, help="STRIP preset false rejection rate (default 0.01)")
    p.add_argument("--n", type=int, default=None, help="STRIP perturbations per input N (default 10)")
    p.add_argument("--blend", default=None, help="STRIP superimposition rule (default max)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--budget", type=int, default=None, help="oracle query budget per scan")
    p.add_argument("--cutoff", type=float, default=None, help="deviation-factor threshold c (default 2, alpha 0.0455)")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="a patched model may lose at most this much clean accuracy (default 0.01)")
    p.add_argument("--min-per-class", type=int, default=None, help="held-out images each class needs (default 5)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the gate stops with verdict error")
    p.add_argument("--no-use-heldout", action="store_true",
                   help="scan from model inversion alone, the paper's plain test (default: the held-out data "
                        "gives the scan its substitute set and benign reference models)")
    p.add_argument("--scan-option", action="append", default=[], metavar="KEY=JSON", help="a DeepInspect option")
    p.add_argument("--patch-option", action="append", default=[], metavar="KEY=JSON", help="a Patcher option")
    p.add_argument("--force", action="store_true", help="gate again even if this configuration decided the version")
    p.add_argument("--force-gate", choices=("true", "false"), default="false",
                   help="--force as a value (for MLflow Projects, whose commands cannot drop a flag)")
    p.add_argument("--adopt", action="store_true",
                   help="a version registered straight through MLflow (no intake tags) is admitted and tagged first")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    keys.add_signing_key(p)


def config_from_args(args):
    """The settings file's document with the flags given on the command line laid over it."""
    from trojan_gate.plugins.gate import GateConfig

    from .options import parse_options

    doc = GateConfig.from_toml(args.config).to_dict() if args.config else GateConfig().to_dict()
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            doc[section][key] = value
    if args.no_use_heldout:
        doc["scan"]["use_heldout"] = False
    doc["scan"].update(parse_options(args.scan_option, "--scan-option"))
    doc["patch"].update(parse_options(args.patch_option, "--patch-option"))
    return GateConfig.from_dict(doc)


def _terminate(signum, frame):
    from trojan_gate.plugins.gate.state import GateInterrupted

    raise GateInterrupted(f"terminated by signal {signal.Signals(signum).name}")


def run(args) -> int:
    from trojan_gate.plugins.automation.workers import die_with_parent
    from trojan_gate.plugins.gate import run_gate
    from trojan_gate.plugins.registry import adopt_version, configure_tracking, resolve

    die_with_parent()  # a gate started by `trojan-gate listen` or `watch` does not outlive it
    config = config_from_args(args)  # a bad setting stops here, before MLflow is touched
    keys.apply(args)
    configure_tracking(args.tracking_uri)
    if args.adopt:  # inside the gate's time limit: a hostile model cannot hang its admission probes
        deadline = None if config.timeout_s is None else time.monotonic() + float(config.timeout_s)
        adopt_version(resolve(args.model_uri), deadline=deadline)
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM fails the gate closed (verdict error)
    try:
        outcome = run_gate(args.model_uri, args.heldout, config, force=args.force or args.force_gate == "true")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(outcome.report, f, indent=2, default=str)
    print(json.dumps(outcome.to_dict(), indent=2, default=str))
    return outcome.exit_code
