"""A cache of trained meta-classifiers, so that a stopped calibration resumes after its last member.

Training one meta-classifier means, every epoch, running the learned queries through every fitting
shadow and back (the probes are learned jointly, so the shadows' answers cannot be cached). On a
pool with costly architectures this is the larger part of the calibration (docs/calibrated-scan.md),
so each member is stored once trained, under

    key = sha256(sorted JSON of {fitting shadows' keys in order, member kind, member settings,
                                 member seed, format})[:24]

in ``<shadow cache>/meta/<key>.npz`` (arrays only, no pickles; written to a temporary name and
renamed, so a kill leaves either the whole file or none). A member read back scores exactly as the
one that was saved (float32 arrays, as trained).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..hashing import sha256_bytes

MEMBER_FORMAT = 1


def member_key(shadow_keys: list, kind: str, settings: dict, seed: int) -> str:
    """The member's cache key (see the module's equation)."""
    doc = {"shadows": list(shadow_keys), "kind": kind, "settings": settings, "seed": int(seed),
           "format": MEMBER_FORMAT}
    return sha256_bytes(json.dumps(doc, sort_keys=True).encode())[:24]


def member_path(cache_dir, key: str) -> Path:
    """Where the member under `key` is stored: ``<cache_dir>/meta/<key>.npz``."""
    return Path(cache_dir) / "meta" / f"{key}.npz"


def save_member(cache_dir, key: str, member) -> Path:
    """Write `member.state()` under `key` (atomic rename)."""
    path = member_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in member.state().items()})
    tmp.replace(path)
    return path


def load_member(cache_dir, key: str, kind, n_classes: int, hidden: int, scale: float):
    """The cached member under `key` rebuilt as `kind` (None when absent or unreadable: it is trained again)."""
    path = member_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        member = kind.from_state(state, n_classes, hidden)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    member.scale = scale
    return member
