"""`trojan-gate keygen --out DIR`: an EC P-256 key pair for signed releases (signing-key.pem, verify-key.pem)."""
from __future__ import annotations

import json

HELP = "write a key pair for signed releases: signing-key.pem (the gate's) and verify-key.pem (serving, promote)"


def add_arguments(p):
    p.add_argument("--out", required=True, help="directory for signing-key.pem (mode 600) and verify-key.pem")


def run(args) -> int:
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV, generate_keypair, key_id

    private, public = generate_keypair(args.out)
    print(json.dumps({"signing_key": str(private), "verify_key": str(public), "key_id": key_id(public),
                      "use": f"export {SIGNING_KEY_ENV}={private} (where the gate runs); "
                             f"export {VERIFY_KEY_ENV}={public} (where models are promoted and served)"}, indent=2))
    return 0
