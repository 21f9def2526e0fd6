"""Scan calibrations in the MLflow registry: register one per task, find the one that matches a model.

A calibration directory (see `gates.metascan.artifact`) is logged as the artifact `calibration`
of a run in experiment `trojan-gate-calibration` and registered as a version of a registered
model whose tag `trojan_gate.kind` is `scan-calibration` (the watcher never gates those). The
version carries

- `trojan_gate.calibration.task`: sha256 of (input shape, number of classes, held-out sha256),
  the key a gate looks the calibration up by;
- `trojan_gate.calibration.sha256`: the directory's sha256, verified on every download;
- the task's fields, the false-block rate, the threshold and the pool's size, for people.

`find_registered(task_key)` returns the newest registered version for a task, so every later
gate of that task reuses it; `load_registered(uri)` downloads, verifies and loads one.
"""
from __future__ import annotations

import hashlib
import json
import tempfile

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates.errors import ArtifactIntegrityError
from trojan_gate.gates.metascan import calibration_sha256, load_calibration

from .registry import RegistryError, VersionRef, ensure_experiment, resolve, tag

KIND = "scan-calibration"
EXPERIMENT = "trojan-gate-calibration"


def task_key(input_shape, n_classes: int, heldout_sha256: str) -> str:
    doc = {"input_shape": [int(v) for v in input_shape], "n_classes": int(n_classes), "heldout_sha256": heldout_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def calibration_task_key(calibration) -> str:
    t = calibration.task_
    return task_key(t["input_shape"], t["n_classes"], t["heldout_sha256"])


def register_calibration(directory, name: str, client: MlflowClient | None = None) -> VersionRef:
    """Log `directory` (a saved, verified calibration) and register it as a new version of `name`."""
    client = client or MlflowClient()
    cal = load_calibration(directory)  # refuses a tampered or incomplete directory before anything is written
    try:
        model = client.get_registered_model(name)
        if (model.tags or {}).get(tag("kind")) != KIND:
            raise RegistryError(f"registered model {name!r} exists and is not a scan calibration "
                                f"(tag {tag('kind')}={KIND!r} missing); choose another name")
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={tag("kind"): KIND},
                                       description="trojan-gate scan calibration (shadow models of one task)")
    ensure_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"calibrate-scan-{name}") as run:
        mlflow.log_params({"n_shadows": cal.n_shadows, "false_block_rate": cal.false_block_rate,
                           "families": ",".join(cal.families), "seed": cal.seed})
        mlflow.log_metrics({"threshold": cal.threshold_, "shadows_kept": cal.pool_["kept"],
                            **{f"power_{k}": v for k, v in cal.power_.items() if isinstance(v, (int, float))}})
        mlflow.log_artifacts(str(directory), artifact_path="calibration")
    t = cal.task_
    tags = {tag("kind"): KIND, tag("calibration.task"): calibration_task_key(cal),
            tag("calibration.sha256"): cal.sha256_, tag("calibration.input_shape"): ",".join(map(str, t["input_shape"])),
            tag("calibration.n_classes"): str(t["n_classes"]), tag("calibration.heldout_sha256"): t["heldout_sha256"],
            tag("calibration.false_block_rate"): f"{cal.false_block_rate:g}",
            tag("calibration.threshold"): f"{cal.threshold_:.6f}", tag("calibration.shadows"): str(cal.pool_["kept"])}
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/calibration", run_id=run.info.run_id,
                                     tags=tags)
    return VersionRef(name, str(mv.version))


def find_registered(key: str, client: MlflowClient | None = None) -> VersionRef | None:
    """The newest registered calibration version whose task key is `key`, or None."""
    client = client or MlflowClient()
    found = client.search_model_versions(f"tags.`{tag('calibration.task')}` = '{key}'")
    found = [v for v in found if (v.tags or {}).get(tag("kind")) == KIND]
    if not found:
        return None
    newest = max(found, key=lambda v: (int(v.creation_timestamp or 0), int(v.version)))
    return VersionRef(newest.name, str(newest.version))


def load_registered(uri_or_ref, client: MlflowClient | None = None):
    """Download a registered calibration, verify it against its sha256 tag, and load it."""
    client = client or MlflowClient()
    ref = uri_or_ref if isinstance(uri_or_ref, VersionRef) else resolve(uri_or_ref, client=client)
    mv = client.get_model_version(ref.name, ref.version)
    tags = mv.tags or {}
    if tags.get(tag("kind")) != KIND or not tags.get(tag("calibration.sha256")):
        raise RegistryError(f"{ref.uri} is not a registered scan calibration (tags {tag('kind')}, "
                            f"{tag('calibration.sha256')} missing)")
    expected = tags[tag("calibration.sha256")]
    with tempfile.TemporaryDirectory(prefix="trojan-gate-calibration-") as tmp:  # loaded into memory, then removed
        local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
        if calibration_sha256(local) != expected:
            raise ArtifactIntegrityError(f"{ref.uri}: the downloaded calibration does not hash to its tag {expected}")
        cal = load_calibration(local, expected_sha256=expected)
    cal.registry_uri_ = ref.uri
    return cal
