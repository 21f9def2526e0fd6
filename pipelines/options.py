"""`--scan-option KEY=JSON` / `--patch-option KEY=JSON` command-line pairs as keyword dicts."""
from __future__ import annotations

import json


def parse_options(items, flag: str = "--option") -> dict:
    """["epochs=20", "lr=[1e-3, 5e-4]", "estimator=spsa"] -> {"epochs": 20, "lr": [...], "estimator": "spsa"}.

    The value is read as JSON and kept as a string when it is not JSON. A pair without "=" or
    with an empty key is refused, naming the flag.
    """
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE (value as JSON), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
