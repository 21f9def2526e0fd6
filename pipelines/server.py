"""`trojan-gate server --workdir DIR`: a local `mlflow server` (SQLite or `--backend-store-uri`) set up for webhooks.

For development, the demo and tests: serves artifacts from WORKDIR/mlartifacts, allows webhook
deliveries to a receiver on this machine, and runs until interrupted.
"""
from __future__ import annotations

import signal
import threading

HELP = "run a local MLflow tracking server (SQL backend, served artifacts, loopback webhooks allowed)"


def add_arguments(p):
    p.add_argument("--workdir", default="trojan-gate-server", help="database (SQLite) and artifacts go here")
    p.add_argument("--backend-store-uri", help="e.g. postgresql://user:pass@127.0.0.1/mlflow (default: SQLite)")
    p.add_argument("--port", type=int, default=5000)


def run(args) -> int:
    from trojan_gate.plugins.automation.server import tracking_server

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    signal.signal(signal.SIGINT, lambda s, f: stop.set())
    with tracking_server(args.workdir, args.backend_store_uri, port=args.port) as url:
        print(f"MLflow tracking server at {url} (export MLFLOW_TRACKING_URI={url}); Ctrl-C stops it", flush=True)
        stop.wait()
    return 0
