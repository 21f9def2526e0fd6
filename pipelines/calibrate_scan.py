"""`trojan-gate calibrate-scan --heldout H.npz --out DIR [--register NAME]`: a task's scan calibration.

Trains the shadow pool on the held-out data alone (cached under `--cache`, so a stopped run
resumes), fits the query-tuned meta-classifier and sets the decision's threshold at the stated
false-block rate on benign shadows it never trained on. `--register NAME` also logs the
directory to MLflow and registers it as a version of NAME, found by every later gate whose
model and held-out data match its task. `--timeout S` stops the work after S seconds (exit 2, nothing
written to `--out` or the registry); the cache keeps what was trained, so the same command resumes.
Exit 0 done, 2 error.
"""
from __future__ import annotations

import json

HELP = "build a task's scan calibration from held-out data (shadow models + meta-classifier); 0 done / 2 error"


def add_arguments(p):
    from trojan_gate.gates.data import default_cache_dir
    from trojan_gate.gates.metascan.triggers import FAMILIES

    p.add_argument("--heldout", required=True, help="the defender's labelled held-out data (.npz or image folder)")
    p.add_argument("--out", required=True, help="directory to write the calibration to")
    p.add_argument("--register", metavar="NAME", help="also register it in MLflow as a version of NAME")
    p.add_argument("--shadows", type=int, default=400, help="shadow models, half trojaned (default 400)")
    p.add_argument("--false-block-rate", type=float, default=0.05, help="benign models flagged at most (default 0.05)")
    p.add_argument("--families", default=",".join(FAMILIES), help="trigger families of the trojaned shadows")
    p.add_argument("--margin-shadows", type=int, default=60,
                   help="benign shadows whose reachable margins name a flagged model's targets (default 60; 0: the "
                        "meta-classifier's class p-values do)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(default_cache_dir() / "shadows"), help="shadow-model cache (resumable)")
    p.add_argument("--min-per-class", type=int, default=20, help="held-out images each class needs (default 20)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the calibration stops (exit 2); what was trained stays cached, so the same "
                        "command resumes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def run(args) -> int:
    import time

    import numpy as np

    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout  # loading the data counts too

    from trojan_gate.gates.data import load_heldout
    from trojan_gate.gates.metascan import ScanCalibration, save_calibration
    from trojan_gate.gates.validation import validate_heldout

    heldout = load_heldout(args.heldout)
    y = np.asarray(heldout.y)
    n_classes = int(y.max()) + 1 if y.size and np.issubdtype(y.dtype, np.integer) else 0
    validate_heldout(heldout.x, heldout.y, tuple(heldout.x.shape[1:]), max(n_classes, 2),
                     min_per_class=args.min_per_class)
    families = tuple(f for f in args.families.split(",") if f)
    cal = ScanCalibration(n_shadows=args.shadows, false_block_rate=args.false_block_rate, families=families,
                          margin_shadows=args.margin_shadows, seed=args.seed, cache_dir=args.cache,
                          progress=not args.no_progress).fit(heldout, deadline=deadline)
    save_calibration(cal, args.out)
    out = {"out": args.out, "threshold": cal.threshold_, "pool": cal.pool_, "power": cal.power_,
           "seconds": cal.seconds_}
    if args.register:
        from trojan_gate.plugins.registry import configure_tracking
        from trojan_gate.plugins.scan_calibration import register_calibration

        configure_tracking(args.tracking_uri)
        out["registered"] = register_calibration(args.out, args.register).uri
    print(json.dumps(out, indent=2))
    return 0
