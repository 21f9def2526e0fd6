"""`trojan-gate scan MODEL.onnx --report R.json`: black-box scan of one model file.

With `--calibration DIR|models:/NAME/V` (built by `trojan-gate calibrate-scan` on the same
held-out data) the calibrated decision decides and DeepInspect's double-MAD test is reported
beside it (`--decision paper` lets the paper's test decide; `--no-paper` skips it unless the
calibrated decision flags the model). Without one, DeepInspect decides, as in the paper.
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
    parser.add_argument("--calibration", help="a task's scan calibration: its directory or models:/NAME/VERSION "
                                              "(needs --heldout: the held-out data it was built on)")
    parser.add_argument("--decision", choices=("calibrated", "paper"), default="calibrated",
                        help="which test decides when a calibration is given (default calibrated)")
    parser.add_argument("--no-paper", action="store_true",
                        help="with a calibration, run DeepInspect only when the calibrated decision flags")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for a models:/ calibration")
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
    from trojan_gate.gates.metascan.decision import decide
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
    calibration, reason = _calibration(args, heldout)
    decision = decide(oracle, heldout, calibration, lambda o, h: scanner.scan(o, heldout=h),
                      paper_beside=not args.no_paper, reason=reason, source=args.calibration or "")
    report = Path(args.report)
    verdict = "trojaned" if decision.is_trojaned else "clean"
    json_path, html_path = write_report(report.parent, kind="scan", model_name=Path(args.model).name, version=None,
                                        verdict=verdict, scan=decision.paper, decision=decision,
                                        meta={"heldout_images": None if heldout is None else len(heldout)},
                                        basename=report.stem)
    print(f"{verdict} (decided by {decision.decided_by}): flagged classes {decision.flagged_classes}, "
          f"instance score {decision.instance_score:.2f} (threshold {decision.threshold:.3g}), "
          f"{decision.queries} queries, {decision.seconds:.1f} s")
    if decision.calibrated is not None:
        print(f"false-block probability {decision.calibrated.false_block_probability:.3f}; paper's test: "
              + ("not run" if decision.paper is None else
                 f"{'trojaned' if decision.paper.is_trojaned else 'clean'} {decision.paper.flagged_classes}"))
    else:
        print(f"decided by the paper's test: {decision.reason}")
    print(f"report: {json_path}\nhtml: {html_path}")
    return EXIT_FLAGGED if decision.is_trojaned else EXIT_OK


def _calibration(args, heldout):
    """(ScanCalibration or None, why): the one given, verified; a model or data of another task is refused."""
    if args.decision == "paper":
        return None, "--decision paper: the paper's test decides"
    if not args.calibration:
        return None, "no --calibration given (build one with `trojan-gate calibrate-scan`)"
    if heldout is None:
        raise ValueError("--calibration needs --heldout: the held-out data the calibration was built on")
    from trojan_gate.plugins.registry import configure_tracking, is_model_uri

    if is_model_uri(args.calibration):
        from trojan_gate.plugins.scan_calibration import load_registered

        configure_tracking(args.tracking_uri)
        return load_registered(args.calibration), f"the calibration {args.calibration}"
    from trojan_gate.gates.metascan import load_calibration

    return load_calibration(args.calibration), f"the calibration in {args.calibration}"
