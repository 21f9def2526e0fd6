"""`trojan-gate check MODEL.onnx --boundary DIR --inputs X.npz --out R.npz`.

Scores inputs with the attached run-time check (or a STRIP boundary) through the same GuardedClassifier
the served model uses and writes, per input, `instance_score` (higher means more trojan-like),
`is_trojaned`, `label`, `probability`, `model_calls` (the served model's inputs it cost) and
`reference_calls` (the reference classifier's). Inputs are read, checked and written a chunk at a
time (`array_stream`), so memory does not grow with the number of inputs.
Exit 0 when no input is flagged, 1 when some input is, 2 on error (a boundary artifact that
does not verify against the model or itself is refused with the mismatch named).
"""
from __future__ import annotations

import json

import numpy as np

from .cli import EXIT_FLAGGED, EXIT_OK

HELP = "score inputs with the run-time guard (exit 0 none flagged, 1 some flagged, 2 error)"


def add_arguments(parser):
    parser.add_argument("model", help="ONNX classifier (.onnx)")
    parser.add_argument("--boundary", required=True, help="boundary artifact directory (boundary.json + bank.npy)")
    parser.add_argument("--inputs", required=True,
                        help=".npz with images under key 'x' (or its only array), or an .npy: (n, C, H, W), (n, H, W); "
                             "float in [0, 1] or uint8; read a chunk at a time")
    parser.add_argument("--out", required=True, help="output .npz: instance_score, is_trojaned, label, probability, "
                                                     "model_calls, reference_calls")
    parser.add_argument("--policy", choices=("flag", "reject"), default="flag",
                        help="reject replaces a flagged input's label by -1 (default: flag)")
    parser.add_argument("--expected-sha256", default=None,
                        help="refuse the boundary artifact unless its artifact sha256 equals this")
    parser.add_argument("--chunk-size", type=int, default=8192,
                        help="inputs read, checked and written at a time (memory is bounded by a chunk)")


COLUMNS = {"instance_score": np.float64, "is_trojaned": np.bool_, "label": np.int64, "probability": np.float64,
           "model_calls": np.int64, "reference_calls": np.int64}


def run(args) -> int:
    from trojan_gate.gates import GuardedClassifier

    from .array_stream import InputStream, ResultWriter

    guard = GuardedClassifier.from_artifacts(args.model, args.boundary, policy=args.policy,
                                             expected_sha256=args.expected_sha256)
    if args.chunk_size < 1:
        raise ValueError("--chunk-size must be >= 1")
    with InputStream(args.inputs) as inputs:
        writer = ResultWriter(args.out, len(inputs), COLUMNS)
        try:
            start, n_flagged = 0, 0
            for x in inputs.chunks(args.chunk_size):
                result = guard.predict(x)
                writer.write(start, result)
                start += len(x)
                n_flagged += int(result["is_trojaned"].sum())
            calls, n = writer.totals("model_calls")
            ref_calls, _ = writer.totals("reference_calls")
            writer.close()
        except BaseException:
            writer.discard()
            raise
    summary = {"inputs": n, "flagged": n_flagged, "threshold": guard.threshold,
               "model_calls_per_input": calls / n if n else 0.0,
               "reference_calls_per_input": ref_calls / n if n else 0.0, "policy": args.policy, "out": str(args.out)}
    print(json.dumps(summary))
    return EXIT_FLAGGED if n_flagged else EXIT_OK
