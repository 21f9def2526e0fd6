"""`trojan-gate listen --port P --secret-env VAR --heldout H.npz`: gate every new model version on a webhook.

Receives MLflow's registry webhooks (`model_version.created`; `model_version_tag.set` with the key
`trojan_gate.regate`), refuses a delivery whose signature, timestamp or id does not check out (401),
and queues a gate of the version it names; `--workers` gates run at once, one per version at a time.
The queue is a file: a receiver that is killed and started again runs what was queued or running.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from .gateopts import add_gate_options, gate_setup

HELP = "receive MLflow registry webhooks and gate every new model version (signed deliveries only)"


def add_arguments(p):
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--secret-env", required=True, help="environment variable holding the webhook secret")
    p.add_argument("--window", type=float, default=300.0, help="accepted clock difference of a delivery, seconds")
    add_gate_options(p)


def run(args) -> int:
    from trojan_gate.plugins.automation.watcher import registry_skip_reason
    from trojan_gate.plugins.automation.webhook import make_handler, receiver
    from trojan_gate.plugins.registry import resolve

    secret = os.environ.get(args.secret_env)
    if not secret:
        raise ValueError(f"the webhook secret variable {args.secret_env} is not set")
    logging.getLogger("trojan_gate").setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    queue, workers = gate_setup(args)
    requeued = queue.recover()
    server = receiver(args.host, args.port, make_handler(secret, queue, lambda n, v: resolve(n, v), args.window,
                                                        skip_reason=registry_skip_reason()))
    stop = threading.Event()

    def shutdown(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    workers.start()
    print(f"listening on http://{args.host}:{server.server_address[1]} ({requeued} gate(s) requeued after a "
          f"restart, queue {queue.path})", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        workers.stop(timeout=1)
    return 0
