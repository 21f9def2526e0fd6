"""The STRIP boundary artifact: `boundary.json` + `bank.npy`, written and verified.

`boundary.json` holds the detection boundary and everything needed to trust it (N, blend
rule, fitted normal, FRR, rule in force, both boundaries, seed, creation time, the model's
and the bank's sha256, library versions, an `extra` dict for fields added later, e.g. an
estimated FAR). It also carries `integrity.content_sha256`, the sha256 of its own canonical
JSON without the `integrity` entry, so an edited boundary is refused on load just like a
swapped bank or a different model. `artifact_sha256(directory)` pins the whole artifact
(both files) for registry tags.

This module knows nothing about the detector: it writes and verifies a document and a bank.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import ArtifactIntegrityError
from ..hashing import sha256_file

BOUNDARY_FILE = "boundary.json"
BANK_FILE = "bank.npy"
FORMAT = "trojan-gate/strip-boundary"
FORMAT_VERSION = 3  # 3: scores higher for more trojan-like inputs (s = -H); version 2 scored H


def versions() -> dict:
    """Versions of the libraries whose behaviour the boundary depends on."""
    import onnxruntime

    from .. import __version__

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


def artifact_sha256(directory) -> str:
    """One hash for the whole artifact: sha256 over the names and sha256 of both files."""
    return files_sha256(directory, (BOUNDARY_FILE, BANK_FILE))


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


def write_artifact(directory, doc: dict, bank: np.ndarray) -> Path:
    """Write `bank.npy` and `boundary.json` (with bank sha256 and content sha256 filled in)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bank_path = directory / BANK_FILE
    np.save(bank_path, np.ascontiguousarray(bank, dtype=np.float32), allow_pickle=False)
    doc = dict(doc)
    doc["format"] = FORMAT
    doc["format_version"] = FORMAT_VERSION
    doc["bank_sha256"] = sha256_file(bank_path)
    doc["bank_shape"] = [int(s) for s in bank.shape]
    doc["integrity"] = {"content_sha256": content_sha256(doc)}
    tmp = directory / (BOUNDARY_FILE + ".part")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(directory / BOUNDARY_FILE)
    return directory


def read_artifact(directory, model_sha256: str | None = None, expected_sha256: str | None = None,
                  input_shape=None) -> tuple[dict, np.ndarray]:
    """Read and verify an artifact; return (document, bank as float32).

    Refuses with ArtifactIntegrityError, naming what mismatched, when a file is missing or
    unreadable, the JSON was edited (content sha256), the bank differs from the one recorded
    (bank sha256), the artifact differs from a pinned `expected_sha256`, the model it was
    calibrated on is not `model_sha256`, or the bank's images are not of `input_shape`.
    """
    directory = Path(directory)
    json_path, bank_path = directory / BOUNDARY_FILE, directory / BANK_FILE
    for p in (json_path, bank_path):
        if not p.is_file():
            raise ArtifactIntegrityError(f"boundary artifact is missing {p.name} in {directory}")
    if expected_sha256 is not None:
        actual = artifact_sha256(directory)
        if actual != expected_sha256:
            raise ArtifactIntegrityError(f"artifact sha256 mismatch: expected {expected_sha256}, found {actual}")
    doc = read_document(json_path, FORMAT, FORMAT_VERSION, "calibrate the model again", "the boundary document")
    bank_sha = sha256_file(bank_path)
    if bank_sha != doc.get("bank_sha256"):
        raise ArtifactIntegrityError(f"{BANK_FILE} sha256 mismatch: recorded {doc.get('bank_sha256')}, "
                                     f"computed {bank_sha} (the perturbation bank was modified or replaced)")
    if model_sha256 is not None and doc.get("model_sha256") != model_sha256:
        raise ArtifactIntegrityError(f"model sha256 mismatch: the boundary was calibrated on model "
                                     f"{doc.get('model_sha256')}, but the model given is {model_sha256}")
    bank = load_bank(bank_path, input_shape)
    if list(bank.shape) != doc.get("bank_shape"):
        raise ArtifactIntegrityError(f"{BANK_FILE} shape {list(bank.shape)} differs from recorded "
                                     f"{doc.get('bank_shape')}")
    return doc, bank


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
