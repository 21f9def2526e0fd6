"""Content-hashed artifact files, shared by every artifact the project writes (STRIP boundaries, run-time
checks, scan calibrations): a JSON document carries `integrity.content_sha256`, the sha256 of its own
canonical JSON without that entry,

    content_sha256(doc) = sha256(json.dumps(doc - integrity, sort_keys, compact, no NaN))

so an edited document is refused on load; `files_sha256` pins a set of files (name and sha256 of each)
for registry tags and signatures; arrays are read back without pickles.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import ArtifactIntegrityError
from .hashing import sha256_file

BANK_FILE = "bank.npy"


def versions() -> dict:
    """Versions of the libraries whose behaviour the boundary depends on."""
    import onnxruntime

    from . import __version__

    return {"trojan-gate": __version__, "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}


def utc_now() -> str:
    """The current UTC time as ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_sha256(doc: dict) -> str:
    """sha256 of the canonical JSON of `doc` without its `integrity` entry."""
    return hashlib.sha256(_canonical({k: v for k, v in doc.items() if k != "integrity"})).hexdigest()


def files_sha256(directory, names, label: str = "boundary artifact") -> str:
    """sha256 over each named file's name and sha256, in the order given (a missing file is refused)."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ArtifactIntegrityError(f"{label} is missing {name} in {directory}")
        h.update(name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def read_document(path: Path, fmt: str, version: int, redo: str, what: str) -> dict:
    """A content-hashed JSON document of format `fmt` and `version`, verified; ArtifactIntegrityError
    names the file and what is wrong (unreadable, another format or version, edited)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactIntegrityError(f"{Path(path).name} is not readable JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ArtifactIntegrityError(f"{Path(path).name} is not a {fmt} document")
    if doc.get("format_version") != version:
        raise ArtifactIntegrityError(f"{Path(path).name} has format version {doc.get('format_version')}; this "
                                     f"trojan-gate reads version {version} ({redo})")
    recorded = (doc.get("integrity") or {}).get("content_sha256")
    actual = content_sha256(doc)
    if recorded != actual:
        raise ArtifactIntegrityError(f"{Path(path).name} content sha256 mismatch: recorded {recorded}, "
                                     f"computed {actual} ({what} was modified)")
    return doc


def load_bank(path, input_shape=None) -> np.ndarray:
    """A saved perturbation bank as contiguous float32, never unpickled; refuses (ArtifactIntegrityError)
    a file that is not a plain array, or images of another shape than `input_shape` when given."""
    try:
        bank = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactIntegrityError(f"{BANK_FILE} is not a readable array: {e}") from e
    if input_shape is not None and (bank.ndim != 1 + len(input_shape) or tuple(bank.shape[1:]) != tuple(input_shape)):
        raise ArtifactIntegrityError(f"bank images have shape {tuple(bank.shape[1:])}, "
                                     f"the model expects {tuple(input_shape)}")
    return np.ascontiguousarray(bank, dtype=np.float32)
