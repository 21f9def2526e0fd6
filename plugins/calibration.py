"""Attach a run-time check to a registered model version and register the signed guarded pyfunc.

The check is a fitted `RuntimeCheck` (gates.runtime: student disagreement + hidden features, the
default) or a `Strip` (the paper's entropy test); both are artifacts of one directory, hashed
whole. On the source version: the artifact is logged to an MLflow run and tagged
(`trojan_gate.check.kind` (runtime | strip), `.threshold`, `.n`, `.frr`, `.blend`, `.rule`,
`.artifact_sha256`, `.artifact_uri`,
`.run_id`, `trojan_gate.guarded_model`, `trojan_gate.signature.key_id`). The guarded model is a
signed release (see `signing`: the ONNX, the artifact and the verdict with the serving policy,
signed by the gate's key) packaged as a models-from-code pyfunc and registered as a version of
`<name>-guarded` with lineage tags pointing back. It refuses to load unless the signature
verifies with the serving host's public key and the signed verdict is passed or patched.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates import __version__
from trojan_gate.gates.data import Dataset
from trojan_gate.gates.errors import ArtifactIntegrityError
from trojan_gate.gates.faults import checkpoint
from trojan_gate.gates.hashing import sha256_file
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.runtime import calibrate_check, check_artifact_sha256, describe
from trojan_gate.gates.runtime.check import DEFAULT_STAGES, DEFAULT_STATISTICS

from .guarded_pyfunc import CODE_FILE, guarded_signature
from .registry import VersionRef, ensure_experiment, fetch_onnx, set_tags, tag, verify_onnx, version_tags

GUARDED_SUFFIX = "-guarded"
# Every distribution the guarded pyfunc imports when it loads and predicts (tests/test_serving.py
# loads one in a fresh interpreter and checks its imports against this list); the project's own
# code travels with the model (`code_paths`), so `mlflow models serve` needs no local install.
SERVING_REQUIREMENTS = ["mlflow", "onnxruntime", "onnx", "numpy", "pandas", "scipy", "tqdm", "model-signing",
                        "cryptography", "pyopenssl"]


@dataclass
class CalibrationOutcome:
    source: VersionRef
    guarded: VersionRef
    artifact_uri: str
    artifact_sha256: str
    run_id: str
    detector: object

    def to_dict(self) -> dict:
        return {"source": self.source.uri, "guarded_model": self.guarded.uri, "run_id": self.run_id,
                **describe(self.detector), "artifact_sha256": self.artifact_sha256,
                "artifact_uri": self.artifact_uri}


def package_code(directory: Path) -> Path:
    """A copy of the project's `gates` and `plugins` folders under `directory/trojan_gate` (no caches):
    the code the guarded pyfunc runs, shipped with the model."""
    import shutil

    import trojan_gate.gates
    import trojan_gate.plugins

    root = Path(directory) / "trojan_gate"
    for package in (trojan_gate.gates, trojan_gate.plugins):
        source = Path(package.__file__).parent
        shutil.copytree(source, root / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def log_guarded_model(release_dir, signature_path, input_shape, guarded_name: str, tags: dict,
                      client: MlflowClient | None = None) -> VersionRef:
    """Log a signed release as a models-from-code pyfunc (inside the active run) and register it."""
    client = client or MlflowClient()
    with tempfile.TemporaryDirectory(prefix="trojan-gate-code-") as tmp:
        info = mlflow.pyfunc.log_model(
            name="guarded_model", python_model=str(CODE_FILE),
            artifacts={"release": str(release_dir), "signature": str(signature_path)},
            signature=guarded_signature(input_shape), pip_requirements=SERVING_REQUIREMENTS,
            code_paths=[str(package_code(Path(tmp)))],
        )
    try:
        client.get_registered_model(guarded_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(guarded_name, tags={tag("managed"): "true", tag("kind"): "guarded"})
    mv = client.create_model_version(guarded_name, source=info.model_uri, run_id=mlflow.active_run().info.run_id,
                                     tags=tags, model_id=info.model_id)
    return VersionRef(guarded_name, str(mv.version))


def attach_check(ref: VersionRef, det, onnx_path, verdict: dict, guarded_name: str | None = None,
                 experiment: str = "trojan-gate-calibrate", client: MlflowClient | None = None) -> CalibrationOutcome:
    """Attach a fitted check (with its threshold) to a registered version: write and log the artifact,
    sign the release (ONNX + artifact + `verdict`, which names the verdict and the serving policy),
    register the guarded model (`NAME-guarded`) and tag the version. `onnx_path` is the version's
    ONNX, checked once more against the registered sha256 before it is packaged."""
    from .signing import signing_key

    key = signing_key()  # no key, no guarded model: refused before anything is written

    client = client or MlflowClient()
    onnx_path = verify_onnx(ref, onnx_path, client)
    if det.model_sha256_ != sha256_file(onnx_path):
        raise ArtifactIntegrityError(f"the run-time check was fitted on model {det.model_sha256_[:12]}…, "
                                     f"not on {ref.uri}")
    with tempfile.TemporaryDirectory(prefix="trojan-gate-calibrate-") as tmp:  # staging, removed when logged
        return _attach(ref, det, Path(tmp), onnx_path, verdict, key, guarded_name, experiment, client)


def _attach(ref, det, work: Path, onnx_path, verdict, key, guarded_name, experiment, client) -> CalibrationOutcome:
    from .signing import key_id, sign_release, write_release

    boundary_dir = det.save(work / "check")
    digest = check_artifact_sha256(boundary_dir)
    summary = describe(det)
    release = write_release(work / "release", onnx_path, boundary_dir, {
        **verdict, "model": ref.uri, "model_sha256": det.model_sha256_, "check_artifact_sha256": digest,
        "check": summary["kind"], "trojan_gate_version": __version__})
    signature = sign_release(release, work / "release.sig", key)
    checkpoint("check.release-signed")
    guarded_name = guarded_name or ref.name + GUARDED_SUFFIX
    nested = mlflow.active_run() is not None  # inside a gate run: a child run of it
    if not nested:
        ensure_experiment(experiment)
    with mlflow.start_run(run_name=f"calibrate-{ref.name}-v{ref.version}", nested=nested) as run:
        mlflow.set_tags({"trojan_gate.model": ref.uri, "trojan_gate.version": __version__})
        mlflow.log_params({"model_uri": ref.uri, "check": summary["kind"], "frr": det.frr_,
                           "n_perturbations": det.n_perturbations, "blend": det.blend, "seed": det.seed,
                           "calibration_size": len(det.bank_), "rule": det.rule})
        mlflow.log_metrics({"check_threshold": float(det.threshold_), **{
            f"check_{k}": float(summary[k]) for k in ("mean", "std", "empirical_threshold", "realised_frr")
            if summary.get(k) is not None}})
        mlflow.log_artifacts(str(boundary_dir), artifact_path="check")
        artifact_uri = mlflow.get_artifact_uri("check")
        signer = key_id(key)
        guarded = log_guarded_model(release, signature, det.bank_.shape[1:], guarded_name, tags={
            tag("source_model"): ref.name, tag("source_version"): ref.version,
            tag("sha256"): det.model_sha256_, tag("check.artifact_sha256"): digest,
            tag("check.threshold"): f"{det.threshold_:.6f}", tag("check.kind"): summary["kind"],
            tag("status"): "guarded",
            tag("signature.key_id"): signer, tag("verdict"): str(verdict.get("verdict")),
        }, client=client)
        set_tags(ref, {
            "check.threshold": f"{det.threshold_:.6f}", "check.n": det.n_perturbations, "check.frr": det.frr_,
            "check.blend": det.blend, "check.rule": det.rule, "check.kind": summary["kind"],
            "check.artifact_sha256": digest,
            "check.artifact_uri": artifact_uri, "check.run_id": run.info.run_id, "guarded_model": guarded.uri,
            "check.policy": verdict.get("serving", {}).get("policy"), "signature.key_id": signer,
        }, client)
        mlflow.log_dict(summary, "check_summary.json")
    return CalibrationOutcome(ref, guarded, artifact_uri, digest, run.info.run_id, det)


def calibrate_registered(ref: VersionRef, heldout: Dataset, frr: float = 0.01, n_perturbations: int = 10,
                         blend: str | None = None, seed: int = 0, min_per_class: int = 5,
                         guarded_name: str | None = None, experiment: str = "trojan-gate-calibrate",
                         onnx_path=None, policy: str = "reject", check: str = "runtime",
                         statistics=DEFAULT_STATISTICS, stages=DEFAULT_STAGES) -> CalibrationOutcome:
    """Verify the version's ONNX, calibrate the run-time check (`check`: runtime | strip) on held-out
    data, attach it and register the guard.

    The signed verdict is the version's own (`trojan_gate.verdict`, "ungated" when it has none):
    recalibrating a gated version keeps it servable, a never-gated one gets a guard that refuses
    to load. `onnx_path`: a copy of the version's ONNX the caller already fetched; it is checked
    against the registered sha256 instead of being downloaded again.
    """
    if onnx_path is None:
        with tempfile.TemporaryDirectory(prefix="trojan-gate-model-") as tmp:
            return calibrate_registered(ref, heldout, frr=frr, n_perturbations=n_perturbations, blend=blend, seed=seed,
                                        min_per_class=min_per_class, guarded_name=guarded_name, experiment=experiment,
                                        onnx_path=fetch_onnx(ref, dst=tmp), policy=policy, check=check,
                                        statistics=statistics, stages=stages)
    client = MlflowClient()
    oracle = ModelOracle(verify_onnx(ref, onnx_path, client))
    det = calibrate_check(oracle, heldout, kind=check, frr=frr, n_perturbations=n_perturbations, blend=blend,
                          statistics=statistics, stages=stages, seed=seed, min_per_class=min_per_class)
    tags = version_tags(ref, client)
    verdict = {"verdict": tags.get(tag("verdict")) or "ungated", "fingerprint": tags.get(tag("gate.fingerprint")),
               "serving": serving_settings(policy)}
    return attach_check(ref, det, onnx_path, verdict, guarded_name=guarded_name, experiment=experiment,
                        client=client)


def serving_settings(policy: str = "reject", max_rows: int = 4096) -> dict:
    """What the guarded model enforces, fixed server-side and signed with the release."""
    from trojan_gate.gates.guard import SERVING_POLICIES

    if policy not in SERVING_POLICIES:
        raise ValueError(f"policy must be one of {SERVING_POLICIES}, not {policy!r}")
    return {"policy": policy, "max_rows": int(max_rows)}
