"""`trojan-gate calibrate`: a STRIP boundary for an ONNX file or a registered model version.

    trojan-gate calibrate MODEL.onnx --heldout H.npz --frr 0.01 --n 10 --out DIR
    trojan-gate calibrate models:/NAME/VERSION --heldout H.npz     # attach + register the guarded model
"""
from __future__ import annotations

import json

from . import keys

HELP = "calibrate a STRIP boundary (file → artifact dir; models:/NAME/VERSION → attached + guarded model)"


def add_arguments(p):
    p.add_argument("model", help="MODEL.onnx or models:/NAME/VERSION (or models:/NAME@ALIAS)")
    p.add_argument("--heldout", required=True, help="held-out labelled data: .npz (x, y) or an image folder")
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
                                       guarded_name=args.guarded_name, policy=args.policy)
        print(json.dumps(outcome.to_dict(), indent=2))
        return 0
    from trojan_gate.gates import ModelOracle
    from trojan_gate.gates.strip import artifact_sha256, calibrate_strip

    if not args.out:
        raise ValueError("--out DIR is required when calibrating a model file")
    oracle = ModelOracle(args.model)
    det = calibrate_strip(oracle, load_heldout(args.heldout, oracle.input_shape), frr=args.frr, n_perturbations=args.n,
                          blend=args.blend, seed=args.seed, min_per_class=args.min_per_class, out_dir=args.out)
    print(json.dumps({"threshold": float(det.threshold_), "mean": float(det.mean_), "std": float(det.std_),
                      "frr": args.frr, "n_perturbations": det.n_perturbations, "blend": det.blend,
                      "artifact_sha256": artifact_sha256(args.out), "out": args.out}, indent=2))
    return 0
