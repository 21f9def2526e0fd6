"""`trojan-gate promote NAME VERSION --alias production`: release approval for CI (0 promoted, 1 refused, 2 error)."""
from __future__ import annotations

import json
import sys

from . import keys

HELP = "move an alias to a version only if the gate passed/patched it and its STRIP artifact verifies"


def add_arguments(p):
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="production")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    keys.add_verify_key(p)


def run(args) -> int:
    from trojan_gate.plugins.promotion import PromotionRefused, promote
    from trojan_gate.plugins.registry import configure_tracking

    keys.apply(args)
    configure_tracking(args.tracking_uri)
    try:
        info = promote(args.name, args.version, args.alias)
    except PromotionRefused as e:
        print(f"trojan-gate promote: refused: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0
