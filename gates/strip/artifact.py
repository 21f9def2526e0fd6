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

import json
from pathlib import Path

import numpy as np

from ..artifact_files import BANK_FILE, content_sha256, files_sha256, load_bank, read_document
from ..errors import ArtifactIntegrityError
from ..hashing import sha256_file

BOUNDARY_FILE = "boundary.json"
FORMAT = "trojan-gate/strip-boundary"
FORMAT_VERSION = 3  # 3: scores higher for more trojan-like inputs (s = -H); version 2 scored H


def artifact_sha256(directory) -> str:
    """One hash for the whole artifact: sha256 over the names and sha256 of both files."""
    return files_sha256(directory, (BOUNDARY_FILE, BANK_FILE))


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
    doc = read_document(json_path, FORMAT, FORMAT_VERSION, "which scores higher for more trojan-like inputs; calibrate "
                        "the model again", "the boundary document")
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


