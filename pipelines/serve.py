"""`trojan-gate serve models:/NAME-guarded/VERSION`: serve a guarded model with `mlflow models serve`.

Refuses (exit 1) a guarded model whose source version is not `passed` or `patched` by a finished
gate; the served process verifies the release's signature with `--verify-key` (or
`$TROJAN_GATE_VERIFY_KEY`) before it answers anything.
"""
from __future__ import annotations

import subprocess
import sys

from . import keys

HELP = "serve a guarded model over REST with `mlflow models serve` (only if its source passed the gate)"


def add_arguments(p):
    p.add_argument("model_uri", help="models:/NAME-guarded/VERSION (or @ALIAS)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    keys.add_verify_key(p)


def run(args) -> int:
    from trojan_gate.plugins.registry import configure_tracking
    from trojan_gate.plugins.serving import ServingRefused, check_servable, serve_command, serving_env

    keys.apply(args)
    uri = configure_tracking(args.tracking_uri)
    try:
        source = check_servable(args.model_uri)
    except ServingRefused as e:
        print(f"trojan-gate serve: refused: {e}", file=sys.stderr)
        return 1
    cmd = serve_command(args.model_uri, args.port, host=args.host, workers=args.workers)
    print(f"serving the guarded model of {source}:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, env=serving_env(uri))
