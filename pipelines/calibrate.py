"""`trojan-gate calibrate`: a run-time check for an ONNX file or a registered model version.

    trojan-gate calibrate MODEL.onnx --heldout H.npz --frr 0.01 --n 10 --out DIR
    trojan-gate calibrate models:/NAME/VERSION --heldout H.npz     # attach + register the guarded model

`--check runtime` (default): student disagreement + hidden features (`--statistics`), one min-p test (gates.runtime);
`--check strip`: the paper's entropy test alone.
"""
from __future__ import annotations

import json

from trojan_gate.gates.runtime.check import DEFAULT_STATISTICS

from . import keys

HELP = "calibrate the run-time check (file → artifact dir; models:/NAME/VERSION → attached + guarded model)"


def add_arguments(p):
    p.add_argument("model", help="MODEL.onnx or models:/NAME/VERSION (or models:/NAME@ALIAS)")
    p.add_argument("--heldout", required=True, help="held-out labelled data: .npz (x, y) or an image folder")
    p.add_argument("--check", choices=("runtime", "strip"), default="runtime",
                   help="runtime: student disagreement + hidden features (default); strip: the paper's test")
    p.add_argument("--statistics", default=",".join(DEFAULT_STATISTICS),
                   help="run-time check statistics, comma-separated from entropy, dispersion, reference, activation")
    p.add_argument("--frr", type=float, default=0.01, help="preset false rejection rate (default 0.01)")
    p.add_argument("--n", type=int, default=10, help="perturbations per input N (default 10)")
    p.add_argument("--blend", default=None, help="superimposition rule (default: the measured best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-per-class", type=int, default=5)
    p.add_argument("--out", help="artifact directory (required for a file model)")
    p.add_argument("--guarded-name", help="registered name of the guarded model (default NAME-guarded)")
    p.add_argument("--policy", choices=("reject", "flag"), default="reject",
                   help="what the guarded model does with a flagged input (signed, fixed server-side)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    keys.add_signing_key(p)


def run(args) -> int:
    from trojan_gate.gates.data import load_heldout
    from trojan_gate.plugins.registry import is_model_uri

    if is_model_uri(args.model):
        from trojan_gate.plugins.calibration import calibrate_registered
        from trojan_gate.plugins.registry import configure_tracking, resolve, version_tags

        keys.apply(args)
        configure_tracking(args.tracking_uri)
        ref = resolve(args.model)
        shape = tuple(int(v) for v in version_tags(ref).get("trojan_gate.input_shape", "").split("x") if v) or None
        outcome = calibrate_registered(ref, load_heldout(args.heldout, shape), frr=args.frr, n_perturbations=args.n,
                                       blend=args.blend, seed=args.seed, min_per_class=args.min_per_class,
                                       guarded_name=args.guarded_name, policy=args.policy, check=args.check,
                                       statistics=_statistics(args))
        print(json.dumps(outcome.to_dict(), indent=2))
        return 0
    from trojan_gate.gates import ModelOracle
    from trojan_gate.gates.runtime import calibrate_check, check_artifact_sha256, describe

    if not args.out:
        raise ValueError("--out DIR is required when calibrating a model file")
    oracle = ModelOracle(args.model)
    det = calibrate_check(oracle, load_heldout(args.heldout, oracle.input_shape), kind=args.check, frr=args.frr,
                          n_perturbations=args.n, blend=args.blend, statistics=_statistics(args), seed=args.seed,
                          min_per_class=args.min_per_class)
    det.save(args.out)
    print(json.dumps({**describe(det), "artifact_sha256": check_artifact_sha256(args.out), "out": args.out}, indent=2))
    return 0


def _statistics(args) -> tuple:
    return tuple(s.strip() for s in args.statistics.split(",") if s.strip())
