"""A scan calibration on disk: `calibration.json` + `meta.npz`, written and verified.

`meta.npz` holds every learned array (the queries, the meta-classifier's weights, the benign
null scores, the target rule's margin null when there is one), saved and read without pickles.
`calibration.json` holds the task it belongs to (input shape, classes, held-out sha256), the decision's settings and threshold, the pool's
summary and measured power, versions, the sha256 of `meta.npz` and its own content sha256, so
an edited threshold or a swapped array is refused by name. `calibration_sha256(dir)` pins the
whole directory (both files): it is the calibration's identity in reports and registry tags.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ArtifactIntegrityError
from ..hashing import sha256_file
from ..artifact_files import content_sha256, files_sha256, read_document, utc_now, versions

CALIBRATION_FILE = "calibration.json"
ARRAYS_FILE = "meta.npz"
FORMAT = "trojan-gate/scan-calibration"
FORMAT_VERSION = 2  # 2: the meta-classifier is an ensemble (arrays meta.<member>.<name>)


def calibration_sha256(directory) -> str:
    """One hash for the whole calibration: sha256 over the names and sha256 of both files."""
    return files_sha256(directory, (CALIBRATION_FILE, ARRAYS_FILE), label="scan calibration")


def save_calibration(calibration, directory) -> Path:
    """Write a fitted `ScanCalibration` to `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"meta.{k}": np.asarray(v, np.float32) for k, v in calibration.meta_.state().items()}
    arrays["null"] = np.asarray(calibration.null_, np.float64)
    arrays["class_null"] = np.asarray(calibration.class_null_, np.float64)
    if getattr(calibration, "margin_null_", None) is not None:  # the target rule's margins (see `margins`)
        arrays["margin_mean"] = np.asarray(calibration.margin_mean_, np.float64)
        arrays["margin_sd"] = np.asarray(calibration.margin_sd_, np.float64)
        arrays["margin_null"] = np.asarray(calibration.margin_null_, np.float64)
    tmp = directory / (ARRAYS_FILE + ".part.npz")
    np.savez(tmp, **arrays)
    tmp.replace(directory / ARRAYS_FILE)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": utc_now(), "versions": versions(),
           "task": calibration.task_, "params": calibration.get_params(), "threshold": calibration.threshold_,
           "pool": calibration.pool_, "power": calibration.power_, "seconds": calibration.seconds_,
           "arrays_sha256": sha256_file(directory / ARRAYS_FILE)}
    if getattr(calibration, "margin_null_", None) is not None:
        doc["margin_threshold"] = float(calibration.margin_threshold_)
    doc["params"]["families"] = list(doc["params"]["families"])
    doc["params"]["attacks"] = list(doc["params"]["attacks"])
    doc["params"]["architectures"] = list(doc["params"]["architectures"])
    doc["queries"] = int(len(calibration.meta_.queries_))
    doc["integrity"] = {"content_sha256": content_sha256(doc)}
    part = directory / (CALIBRATION_FILE + ".part")
    part.write_text(json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    part.replace(directory / CALIBRATION_FILE)
    return directory


def load_calibration(directory, expected_sha256: str | None = None):
    """Read and verify a saved calibration; returns a fitted `ScanCalibration`.

    Refuses (ArtifactIntegrityError, naming what) a missing file, a directory that differs from
    a pinned `expected_sha256`, an edited document, a replaced `meta.npz`, another format
    version, or arrays of the wrong shapes.
    """
    from .calibration import ScanCalibration
    from .ensemble import MetaEnsemble
    from .meta import QueryMetaClassifier
    from .probes import StampProbeMeta

    directory = Path(directory)
    actual = calibration_sha256(directory)
    if expected_sha256 is not None and actual != expected_sha256:
        raise ArtifactIntegrityError(f"scan calibration sha256 mismatch: expected {expected_sha256}, found {actual}")
    doc = read_document(directory / CALIBRATION_FILE, FORMAT, FORMAT_VERSION, "run calibrate-scan again",
                        "the calibration document")
    if sha256_file(directory / ARRAYS_FILE) != doc.get("arrays_sha256"):
        raise ArtifactIntegrityError(f"{ARRAYS_FILE} sha256 mismatch (the learned arrays were modified or replaced)")
    try:
        with np.load(directory / ARRAYS_FILE, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        params = doc["params"]
        task = doc["task"]
        k = int(task["n_classes"])
        kind = StampProbeMeta if params["probes"] == "stamp" else QueryMetaClassifier
        meta = MetaEnsemble.from_state({n[5:]: v for n, v in arrays.items() if n.startswith("meta.")}, kind,
                                       int(params["n_meta"]), k, int(params["hidden"]), float(params["scale"]))
        null, class_null = arrays["null"], arrays["class_null"]
        has_margins = "margin_null" in arrays
        if has_margins != ("margin_threshold" in doc):
            raise ValueError("the margin arrays and the margin threshold must come together")
        if has_margins and not (arrays["margin_mean"].shape == arrays["margin_sd"].shape == (k,)
                                and arrays["margin_null"].ndim == 1 and (arrays["margin_sd"] > 0).all()):
            raise ValueError("the margin null's shapes do not match the task")
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ArtifactIntegrityError(f"scan calibration in {directory} is incomplete or malformed: {e}") from e
    if tuple(meta.queries_.shape[1:]) != tuple(task["input_shape"]) or class_null.shape != (len(null), k):
        raise ArtifactIntegrityError("scan calibration arrays do not match its task (queries or null shapes)")
    cal = ScanCalibration(**{n: v for n, v in params.items()})
    cal.meta_, cal.null_, cal.class_null_ = meta, np.sort(null), class_null
    cal.threshold_, cal.task_, cal.pool_, cal.power_ = float(doc["threshold"]), task, doc["pool"], doc["power"]
    cal.seconds_, cal.sha256_, cal.document_ = doc.get("seconds", {}), actual, doc
    cal.margin_mean_ = cal.margin_sd_ = cal.margin_null_ = cal.margin_threshold_ = None
    if has_margins:
        cal.margin_mean_, cal.margin_sd_ = arrays["margin_mean"], arrays["margin_sd"]
        cal.margin_null_, cal.margin_threshold_ = np.sort(arrays["margin_null"]), float(doc["margin_threshold"])
    elif "margin_shadows" not in params:
        cal.margin_shadows = 0  # saved before the margin target rule: the class p-values name the targets
    return cal
