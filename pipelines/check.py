"""`trojan-gate check MODEL.onnx --boundary DIR --inputs X.npz --out R.npz`.

Scores inputs with the attached run-time check (or a STRIP boundary) through the same GuardedClassifier
the served model uses and writes, per input, `instance_score` (higher means more trojan-like),
`is_trojaned`, `label`, `probability` and `model_calls` (the served model's inputs it cost).
Exit 0 when no input is flagged, 1 when some input is, 2 on error (a boundary artifact that
does not verify against the model or itself is refused with the mismatch named).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .cli import EXIT_FLAGGED, EXIT_OK

HELP = "score inputs with the run-time guard (exit 0 none flagged, 1 some flagged, 2 error)"


def add_arguments(parser):
    parser.add_argument("model", help="ONNX classifier (.onnx)")
    parser.add_argument("--boundary", required=True, help="boundary artifact directory (boundary.json + bank.npy)")
    parser.add_argument("--inputs", required=True,
                        help=".npz with images under key 'x' (or its only array): (n, C, H, W), (n, H, W); "
                             "float in [0, 1] or uint8")
    parser.add_argument("--out", required=True, help="output .npz: instance_score, is_trojaned, label, probability, model_calls")
    parser.add_argument("--policy", choices=("flag", "reject"), default="flag",
                        help="reject replaces a flagged input's label by -1 (default: flag)")
    parser.add_argument("--expected-sha256", default=None,
                        help="refuse the boundary artifact unless its artifact sha256 equals this")
    parser.add_argument("--batch-size", type=int, default=None, help="inputs per model call")


def load_inputs(path) -> np.ndarray:
    """Images from an .npz: key 'x', else its single array; uint8 scaled to [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inputs not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        if "x" in z.files:
            x = z["x"]
        elif len(z.files) == 1:
            x = z[z.files[0]]
        else:
            raise KeyError(f"{path} has keys {z.files}; put the images under 'x'")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[:, None]
    return x


def run(args) -> int:
    from trojan_gate.gates import GuardedClassifier

    guard = GuardedClassifier.from_artifacts(args.model, args.boundary, policy=args.policy,
                                             expected_sha256=args.expected_sha256)
    if args.batch_size:
        guard.batch_size = args.batch_size
    x = load_inputs(args.inputs)
    result = guard.predict(x)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a file object keeps the name exactly as given
        np.savez_compressed(f, instance_score=result["instance_score"], is_trojaned=result["is_trojaned"],
                            label=result["label"], probability=result["probability"],
                            model_calls=result["model_calls"])
    n_flagged = int(result["is_trojaned"].sum())
    summary = {"inputs": int(len(x)), "flagged": n_flagged, "threshold": guard.threshold,
               "model_calls_per_input": float(np.mean(result["model_calls"])) if len(x) else 0.0,
               "policy": args.policy, "out": str(out)}
    print(json.dumps(summary))
    return EXIT_FLAGGED if n_flagged else EXIT_OK
