"""The gate options `listen` and `watch` pass on to every gate they run (the `trojan-gate gate` flags)."""
from __future__ import annotations

import os

from . import keys


def add_gate_options(p):
    p.add_argument("--heldout", required=True, help="held-out labelled data every gate uses (.npz or image folder)")
    p.add_argument("--policy", choices=["block", "patch"], default="block")
    p.add_argument("--alias", default="candidate", help="alias given to a version that passes")
    p.add_argument("--config", help="settings file for every gate (TOML, see README)")
    p.add_argument("--workers", type=int, default=1, help="gates run at once (one per version at a time)")
    p.add_argument("--queue", help="the persistent queue file, one for listen and watch "
                                   "(default: ~/.cache/trojan-gate/gate-queue.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--dispatch", choices=("local", "kubernetes"), default="local",
                   help="run each gate here, or as an MLflow Project run on Kubernetes (one Job per gate)")
    p.add_argument("--backend-config", help="with --dispatch kubernetes: the kubernetes_config.json")
    p.add_argument("--project-uri", default="deploy/kubernetes", help="with --dispatch kubernetes: the MLproject")
    keys.add_signing_key(p)


def gate_setup(args, queue_name: str = "gate-queue"):
    """(queue, workers) for `listen` / `watch`: the gate command every job runs, with absolute paths."""
    from trojan_gate.gates.data import default_cache_dir
    from trojan_gate.plugins.automation.queue import GateQueue
    from trojan_gate.plugins.automation.watcher import record_given_up
    from trojan_gate.plugins.automation.workers import GateCommand, GateWorkers
    from trojan_gate.plugins.gate.config import GateConfig
    from trojan_gate.plugins.registry import configure_tracking

    if args.config and args.dispatch == "local":
        GateConfig.from_toml(args.config)  # a bad settings file stops here, not in every gate
    keys.apply(args)
    uri = configure_tracking(args.tracking_uri)
    queue = GateQueue(args.queue or default_cache_dir() / f"{queue_name}.db", on_give_up=record_given_up())
    if args.dispatch == "kubernetes" and not args.backend_config:
        raise ValueError("--dispatch kubernetes needs --backend-config kubernetes_config.json")
    remote = args.dispatch == "kubernetes"  # paths are the cluster's, as given
    command = GateCommand(heldout=args.heldout if remote else os.path.abspath(args.heldout), policy=args.policy,
                          alias=args.alias, tracking_uri=uri, dispatch=args.dispatch, project_uri=args.project_uri,
                          backend_config=args.backend_config,
                          config=(args.config if remote else os.path.abspath(args.config)) if args.config else None)
    return queue, GateWorkers(queue, command, workers=args.workers)
