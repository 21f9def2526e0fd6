"""Where trojan-gate meets the MLflow model registry: intake, tags, fetching verified models.

Tag names all start with `trojan_gate.`. Intake registers a third-party ONNX file as a new
model version (mlflow.onnx flavor, weights in one file so it can be hashed) with tags
`trojan_gate.sha256`, `.source`, `.input_shape`, `.n_classes`, `.status=pending`.
Everything read back from the registry is verified against the sha256 tag first.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates import __version__
from trojan_gate.gates.errors import ArtifactIntegrityError, TrojanGateError
from trojan_gate.gates.faults import checkpoint
from trojan_gate.gates.hashing import sha256_file
from trojan_gate.gates.admission import AdmissionLimits
from trojan_gate.gates.oracle import DEFAULT_CALL_TIMEOUT_S, ModelOracle

TAG = "trojan_gate."
STATUS_PENDING = "pending"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ONNX_FILE = "model.onnx"


class RegistryError(TrojanGateError):
    """A registry object is missing or not in the state an operation needs."""


def tag(name: str) -> str:
    return TAG + name


def configure_tracking(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    """The experiment `name`, created if missing, made current. Two gates starting at once may both
    find it missing: the one whose create loses the race reads the winner's."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException as e:
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise RegistryError(f"experiment {name!r} could not be created: {e}") from e
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def is_model_uri(s: str) -> bool:
    return str(s).startswith("models:/")


def resolve(uri_or_name: str, version: str | int | None = None, client: MlflowClient | None = None) -> VersionRef:
    """`models:/NAME/VERSION`, `models:/NAME@ALIAS`, or NAME + VERSION → a checked VersionRef."""
    client = client or MlflowClient()
    if version is not None:
        name, ver = uri_or_name, str(version)
    else:
        m = _URI.match(str(uri_or_name))
        if not m:
            raise RegistryError(f"not a model version URI: {uri_or_name!r} (expected models:/NAME/VERSION or models:/NAME@ALIAS)")
        name = m["name"]
        if m["alias"]:
            try:
                ver = client.get_model_version_by_alias(name, m["alias"]).version
            except mlflow.exceptions.MlflowException as e:
                raise RegistryError(f"alias {m['alias']!r} of model {name!r} not found") from e
        else:
            ver = m["version"]
    try:
        client.get_model_version(name, ver)
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"model version {name}/{ver} not found in the registry") from e
    return VersionRef(name, str(ver))


def every_page(search, **kwargs):
    """Every result of an MLflow search, page after page (one call returns one page and a token:
    `search_registered_models` stops at 100 models unless asked for the next page)."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def versions_of(name: str, client: MlflowClient | None = None) -> list:
    """Every version of registered model `name` (any name: one holding both quote characters, which no
    filter string can hold, is matched over all versions instead)."""
    client = client or MlflowClient()
    if "'" not in name:
        return list(every_page(client.search_model_versions, filter_string=f"name='{name}'"))
    if '"' not in name:
        return list(every_page(client.search_model_versions, filter_string=f'name="{name}"'))
    return [v for v in every_page(client.search_model_versions) if v.name == name]


def version_tags(ref: VersionRef, client: MlflowClient | None = None) -> dict:
    client = client or MlflowClient()
    return dict(client.get_model_version(ref.name, ref.version).tags)


def set_tags(ref: VersionRef, tags: dict, client: MlflowClient | None = None):
    client = client or MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(ref.name, ref.version, k if k.startswith(TAG) else tag(k), str(v))
        checkpoint("registry.tag")


def onnx_signature(input_shape, n_classes):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) + tuple(input_shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(n_classes)))]))


def intake_onnx(path, name: str, source: str | None = None, description: str | None = None,
                experiment: str = "trojan-gate-intake", extra_tags: dict | None = None,
                limits: AdmissionLimits = AdmissionLimits(),
                call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S) -> VersionRef:
    """Register a third-party ONNX file as a new version of `name`, status pending.

    The file must pass admission (see `gates.admission`: size, no external data, standard
    operators only, nothing random, a bounded input, answers that depend on each row alone) and
    look like an image classifier ((batch, C, H, W) float input, (batch, K) output); otherwise
    ModelLoadError naming the cause, and the registry is left untouched. The logged MLflow model
    is read back before it is registered and again after: its MLmodel file and the ONNX it loads
    are pinned by `trojan_gate.mlmodel_sha256` and `trojan_gate.sha256`; a version whose read-back
    fails is deleted again, so no unverified version is left behind.
    """
    import onnx

    path = Path(path)
    oracle = ModelOracle(path, limits=limits, call_timeout_s=call_timeout_s).probe()  # raises before anything is written
    info = oracle.info
    proto = onnx.load_model_from_string(oracle.model_bytes)
    client = MlflowClient()
    nested = mlflow.active_run() is not None  # e.g. a patched version registered inside a gate run
    if not nested:
        ensure_experiment(experiment)
    tags = {
        tag("sha256"): info.sha256,
        tag("source"): source or str(path.resolve()),
        tag("input_shape"): "x".join(map(str, info.input_shape)),
        tag("n_classes"): str(info.n_classes),
        tag("classes"): ",".join(str(i) for i in range(info.n_classes)),
        tag("status"): STATUS_PENDING,
        tag("intake_version"): __version__,
    }
    tags.update({k if k.startswith(TAG) else tag(k): str(v) for k, v in (extra_tags or {}).items()})
    with mlflow.start_run(run_name=f"intake-{name}", nested=nested) as run:
        mlflow.log_params({"model_file": path.name, "sha256": info.sha256, "input_shape": str(info.input_shape),
                           "n_classes": info.n_classes, "opset": info.opset})
        # requirements declared, not inferred: inference loads the model in a subprocess (seconds per intake)
        model_info = mlflow.onnx.log_model(proto, name="model", save_as_external_data=False,
                                           signature=onnx_signature(info.input_shape, info.n_classes),
                                           pip_requirements=mlflow.onnx.get_default_pip_requirements())
        checkpoint("intake.logged")
        with tempfile.TemporaryDirectory(prefix="trojan-gate-intake-") as tmp:
            logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_info.model_uri, dst_path=tmp))
            onnx_file, mlmodel_sha = loaded_onnx(logged)
            if sha256_file(onnx_file) != info.sha256:
                raise ArtifactIntegrityError("the logged MLflow model does not load the intake file")
        tags[tag("mlmodel_sha256")] = mlmodel_sha
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, tags={tag("managed"): "true"})
        mv = client.create_model_version(name, source=model_info.model_uri, run_id=run.info.run_id, tags=tags,
                                         description=description, model_id=model_info.model_id)
        checkpoint("intake.registered")
    ref = VersionRef(name, str(mv.version))
    try:  # read back what the registry serves and check it is the file we were given
        check_registered(ref, client)
    except Exception:
        client.delete_model_version(name, mv.version)
        raise
    return ref


def adopt_version(ref: VersionRef, client: MlflowClient | None = None,
                  limits: AdmissionLimits = AdmissionLimits(), deadline: float | None = None) -> dict:
    """Bring a version registered straight through MLflow (no `trojan-gate intake`) under the gate:
    download it, require an mlflow.onnx model that passes admission, and write the intake tags
    (sha256 of the ONNX that MLmodel loads and of MLmodel itself, input shape, classes,
    `status=pending`, `adopted=true`). A version that is already managed is left as it is. A
    refused one loses its aliases and gets `verdict=error` with the cause, so it is never served
    and a watcher does not take it again; the refusal is raised."""
    client = client or MlflowClient()
    tags = version_tags(ref, client)
    if tags.get(tag("sha256")):
        return tags
    try:
        with tempfile.TemporaryDirectory(prefix="trojan-gate-adopt-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=tmp))
            onnx_file, mlmodel_sha = loaded_onnx(local)
            info = ModelOracle(onnx_file, limits=limits, deadline=deadline).probe().info
    except TrojanGateError as e:
        for alias in client.get_model_version(ref.name, ref.version).aliases or []:
            client.delete_registered_model_alias(ref.name, alias)
        set_tags(ref, {"verdict": "error", "verdict.error": f"not admitted: {e}"[:4000], "gate.state": "done",
                       "status": "refused"}, client)
        raise
    source = client.get_model_version(ref.name, ref.version).source
    set_tags(ref, {"sha256": info.sha256, "mlmodel_sha256": mlmodel_sha, "source": source,
                   "input_shape": "x".join(map(str, info.input_shape)), "n_classes": str(info.n_classes),
                   "classes": ",".join(str(i) for i in range(info.n_classes)), "status": STATUS_PENDING,
                   "intake_version": __version__, "adopted": "true"}, client)
    return version_tags(ref, client)


def loaded_onnx(model_dir) -> tuple[Path, str]:
    """The ONNX file an MLflow model folder's MLmodel loads (its onnx flavor's `data`), and the sha256
    of the MLmodel file itself. Refuses a folder whose MLmodel is missing, loads something else, or
    points outside the folder."""
    import yaml

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ArtifactIntegrityError(f"{model_dir} holds no MLmodel file")
    doc = yaml.safe_load(mlmodel.read_text())
    flavors = (doc or {}).get("flavors") or {}
    loader = (flavors.get("python_function") or {}).get("loader_module")
    rel = (flavors.get("onnx") or {}).get("data")
    if loader != "mlflow.onnx" or not rel:
        raise ArtifactIntegrityError(f"{mlmodel} is not an mlflow.onnx model (loader {loader!r}, data {rel!r})")
    onnx_file = (model_dir / rel).resolve()
    if model_dir.resolve() not in onnx_file.parents or not onnx_file.is_file():
        raise ArtifactIntegrityError(f"{mlmodel} loads {rel!r}, which is not a file inside the model")
    return onnx_file, sha256_file(mlmodel)


def check_registered(ref: VersionRef, client: MlflowClient | None = None) -> str:
    """`fetch_onnx` into a scratch folder that is removed afterwards: raises unless the registry serves
    the file the intake tags name; returns its sha256."""
    with tempfile.TemporaryDirectory(prefix="trojan-gate-model-") as tmp:
        return sha256_file(fetch_onnx(ref, dst=tmp, client=client))


def fetch_onnx(ref: VersionRef, dst: str | None = None, client: MlflowClient | None = None) -> Path:
    """Download the version's MLflow model and return the ONNX file its MLmodel loads, verified against
    `trojan_gate.sha256` (and the MLmodel file against `trojan_gate.mlmodel_sha256`). Without `dst`
    the download goes to a new temporary folder that the caller owns (and removes)."""
    client = client or MlflowClient()
    expected = _registered_sha256(ref, client)
    dst = dst or tempfile.mkdtemp(prefix="trojan-gate-model-")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=dst))
    onnx_file, mlmodel_sha = loaded_onnx(local)
    pinned = version_tags(ref, client).get(tag("mlmodel_sha256"))
    if pinned and pinned != mlmodel_sha:
        raise ArtifactIntegrityError(f"{ref.uri}: MLmodel sha256 {mlmodel_sha[:12]}… does not match the registered "
                                     f"{tag('mlmodel_sha256')} {pinned[:12]}… (tampered model metadata?)")
    return _verified(ref, onnx_file, expected)


def verify_onnx(ref: VersionRef, path, client: MlflowClient | None = None) -> Path:
    """A local copy of the version's ONNX (an earlier `fetch_onnx`), checked again against the
    `trojan_gate.sha256` tag, so a file changed since it was fetched is refused like a tampered one."""
    return _verified(ref, Path(path), _registered_sha256(ref, client or MlflowClient()))


def _registered_sha256(ref: VersionRef, client: MlflowClient) -> str:
    expected = version_tags(ref, client).get(tag("sha256"))
    if not expected:
        raise RegistryError(f"{ref.uri} has no {tag('sha256')} tag: register it with `trojan-gate intake` first")
    return expected


def _verified(ref: VersionRef, onnx_path: Path, expected: str) -> Path:
    actual = sha256_file(onnx_path)
    if actual != expected:
        raise ArtifactIntegrityError(f"{ref.uri}: model file sha256 {actual[:12]}… does not match the "
                                     f"registered {tag('sha256')} {expected[:12]}… (tampered artifact?)")
    return onnx_path
