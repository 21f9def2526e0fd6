"""`trojan-gate scan MODEL.onnx --report R.json`: black-box DeepInspect scan of one model file.

Writes the report in the gate's format: `R.json` (machine report) and `R.html` beside it
(verdict, findings, deviation-factor chart, recovered triggers). Exit 0 clean, 1 trojan
suspected, 2 error (unreadable model, bad held-out data, exhausted budget, bad settings, ...).
"""
from __future__ import annotations

from pathlib import Path

from .cli import EXIT_FLAGGED, EXIT_OK

HELP = "scan an ONNX classifier for trojans with black-box DeepInspect (0 clean / 1 trojaned / 2 error)"


def add_arguments(parser):
    parser.add_argument("model", help="path of the .onnx classifier")
    parser.add_argument("--report", required=True, help="where to write the JSON report (the HTML page goes beside it)")
    parser.add_argument("--heldout", help="labelled clean data (.npz with x, y, or an image folder): the substitute "
                                          "set and the benign reference models (default: model inversion alone)")
    parser.add_argument("--config", help="settings file (TOML); its [scan] section applies (see README)")
    parser.add_argument("--references", type=int, default=None,
                        help="benign reference models trained on the held-out data (default 3; 0: the paper's test)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--budget", type=int, help="maximum number of oracle queries")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--cutoff", type=float, help="deviation-factor threshold c (default 2)")
    g.add_argument("--alpha", type=float, help="significance level; c = Phi^-1(1 - alpha/2)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from trojan_gate.gates.data import load_heldout
    from trojan_gate.gates.deepinspect import DeepInspect
    from trojan_gate.gates.oracle import ModelOracle
    from trojan_gate.gates.validation import validate_heldout
    from trojan_gate.plugins.gate.config import GateConfig
    from trojan_gate.plugins.report import write_report

    config = GateConfig.from_toml(args.config) if args.config else GateConfig()
    options = dict(config.scan.options)
    if args.references is not None:
        options["reference_models"] = args.references
    oracle = ModelOracle(args.model)
    heldout = None
    if args.heldout:
        heldout = load_heldout(args.heldout, oracle.input_shape)
        validate_heldout(heldout.x, heldout.y, oracle.input_shape, oracle.n_classes,
                         min_per_class=config.min_per_class)
    cutoff = args.cutoff if args.cutoff is not None else (None if args.alpha is not None else config.scan.cutoff)
    scanner = DeepInspect(cutoff=cutoff, alpha=args.alpha, seed=config.seed if args.seed is None else args.seed,
                          budget=args.budget if args.budget is not None else config.scan.budget,
                          progress=not args.no_progress, **options)
    result = scanner.scan(oracle, heldout=heldout)
    report = Path(args.report)
    json_path, html_path = write_report(report.parent, kind="scan", model_name=Path(args.model).name, version=None,
                                        verdict="trojaned" if result.is_trojaned else "clean", scan=result,
                                        meta={"heldout_images": None if heldout is None else len(heldout)},
                                        basename=report.stem)
    print(f"{'trojaned' if result.is_trojaned else 'clean'}: flagged classes {result.flagged_classes}, "
          f"instance score {result.instance_score:.2f} (threshold {result.threshold:.3g}), "
          f"{result.queries} queries, {result.seconds:.1f} s")
    print(f"report: {json_path}\nhtml: {html_path}")
    return EXIT_FLAGGED if result.is_trojaned else EXIT_OK
