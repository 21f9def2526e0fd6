"""The `--signing-key` / `--verify-key` flags shared by the commands that sign or verify releases."""
from __future__ import annotations

import os


def add_signing_key(p):
    p.add_argument("--signing-key", help="private PEM key that signs releases (default $TROJAN_GATE_SIGNING_KEY)")


def add_verify_key(p):
    p.add_argument("--verify-key", help="public PEM key that verifies releases (default $TROJAN_GATE_VERIFY_KEY)")


def apply(args):
    """Export the keys given on the command line to the environment the library (and `mlflow models
    serve`) reads them from."""
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV

    for flag, env in (("signing_key", SIGNING_KEY_ENV), ("verify_key", VERIFY_KEY_ENV)):
        value = getattr(args, flag, None)
        if value:
            os.environ[env] = os.path.abspath(value)
