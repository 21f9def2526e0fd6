"""`trojan-gate serve models:/NAME-guarded/VERSION`: serve the guarded model with `mlflow models serve`."""
from __future__ import annotations

import subprocess

HELP = "serve a guarded model over REST with `mlflow models serve` (env-manager local)"


def add_arguments(p):
    p.add_argument("model_uri", help="models:/NAME-guarded/VERSION (or @ALIAS)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def run(args) -> int:
    from trojan_gate.plugins.registry import configure_tracking
    from trojan_gate.plugins.serving import serve_command, serving_env

    uri = configure_tracking(args.tracking_uri)
    cmd = serve_command(args.model_uri, args.port, host=args.host, workers=args.workers)
    print("serving:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, env=serving_env(uri))
