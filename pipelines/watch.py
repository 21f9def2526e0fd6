"""`trojan-gate watch --interval S --heldout H.npz`: gate every model version that has no verdict, by polling.

For stores without webhooks. Same gate options and queue habits as `trojan-gate listen`; `--once`
makes one pass, runs the gates it queued, and exits.
"""
from __future__ import annotations

import logging
import signal
import threading

from .gateopts import add_gate_options, gate_setup

HELP = "poll the registry and gate every model version without a verdict (for stores without webhooks)"


def add_arguments(p):
    p.add_argument("--interval", type=float, default=60.0, help="seconds between passes")
    p.add_argument("--once", action="store_true", help="one pass: queue, gate, exit")
    add_gate_options(p)


def run(args) -> int:
    from trojan_gate.plugins.automation.watcher import watch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    queue, workers = gate_setup(args)
    queue.recover()
    if args.once:
        queued = watch(queue, workers, once=True)
        print(f"queued {queued} version(s); queue: {queue.jobs()[-queued:] if queued else []}", flush=True)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    signal.signal(signal.SIGINT, lambda s, f: stop.set())
    workers.start()
    try:
        watch(queue, workers, interval_s=args.interval, stop=stop)
    finally:
        workers.stop(timeout=1)
    return 0
