"""`trojan-gate webhook install --url URL --secret-env VAR`: the registry webhook that feeds `trojan-gate listen`.

Creates the webhook (or updates the one with the same name) for `model_version.created` and
`model_version_tag.set`, with the secret from the environment, then asks MLflow to send a test
delivery and prints what the receiver answered. The tracking server must allow the receiver's URL:
for plain http or a loopback/private receiver it needs, in the *server's* environment,
MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true (development
only; use https and a routable receiver in production), and MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY
so that the stored secret survives a server restart.
"""
from __future__ import annotations

import json
import os
import sys

HELP = "create or update the MLflow registry webhook for `trojan-gate listen` and test it"
EVENTS = ["model_version.created", "model_version_tag.set"]
SERVER_SETTINGS = ("MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https (plain http), MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true "
                   "(loopback or private receiver), MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=<key> (secrets survive "
                   "restarts): set them in the tracking server's environment")


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    inst = sub.add_parser("install", help="create or update the webhook and send a test delivery")
    inst.add_argument("--url", required=True, help="the receiver, e.g. http://127.0.0.1:8787/")
    inst.add_argument("--secret-env", required=True, help="environment variable holding the shared secret")
    inst.add_argument("--name", default="trojan-gate")
    inst.add_argument("--tracking-uri", help="the tracking server (default $MLFLOW_TRACKING_URI)")


def install(url: str, secret: str, name: str = "trojan-gate", client=None) -> dict:
    from mlflow import MlflowClient

    client = client or MlflowClient()
    existing = [w for w in client.list_webhooks() if w.name == name]
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, url=url, events=EVENTS, secret=secret, status="ACTIVE")
    else:
        hook = client.create_webhook(name=name, url=url, events=EVENTS, secret=secret,
                                     description="trojan-gate: gate every new model version")
    result = client.test_webhook(hook.webhook_id, event="model_version_tag.set")
    return {"webhook_id": hook.webhook_id, "name": name, "url": url, "events": EVENTS, "updated": bool(existing),
            "test": {"success": result.success, "status": result.response_status, "body": result.response_body,
                     "error": result.error_message}}


def run(args) -> int:
    from trojan_gate.plugins.registry import configure_tracking

    if args.action != "install":
        raise ValueError("choose an action: install")
    secret = os.environ.get(args.secret_env)
    if not secret:
        raise ValueError(f"the webhook secret variable {args.secret_env} is not set")
    configure_tracking(args.tracking_uri)
    out = install(args.url, secret, args.name)
    print(json.dumps(out, indent=2))
    if not out["test"]["success"]:
        print(f"the test delivery failed; if the receiver is plain http or on a private address, the tracking "
              f"server needs: {SERVER_SETTINGS}", file=sys.stderr)
        return 1
    return 0
