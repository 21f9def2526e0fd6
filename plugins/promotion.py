"""Release approval: move an alias (e.g. `production`) only to a version the gate let through.

Refuses unless a finished gate decided the version passed or patched, its ONNX still hashes
to the intake tag, and the STRIP artifact its guarded model serves hashes to
`trojan_gate.strip.artifact_sha256` and verifies against the model (model + bank hashes).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates.errors import TrojanGateError
from trojan_gate.gates.oracle import ModelOracle

from .registry import fetch_onnx, resolve, tag, version_tags

PROMOTABLE = ("passed", "patched")


class PromotionRefused(TrojanGateError):
    """The version may not receive the alias; the message says why."""


def guarded_artifact(model_dir: Path, key: str) -> Path:
    """Where a downloaded guarded pyfunc keeps its artifact `key`, as its MLmodel file records it."""
    import yaml

    doc = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    try:
        rel = doc["flavors"]["python_function"]["artifacts"][key]["path"]
    except (KeyError, TypeError) as e:
        raise PromotionRefused(f"{model_dir} is not a guarded model: its MLmodel lists no artifact {key!r}") from e
    path = (Path(model_dir) / rel).resolve()
    if Path(model_dir).resolve() not in path.parents:
        raise PromotionRefused(f"the guarded model's artifact {key!r} points outside the model: {rel!r}")
    return path


def verify_for_promotion(name: str, version: str | int, client: MlflowClient | None = None) -> dict:
    """Refuse (PromotionRefused, naming why) unless the version was decided passed or patched by a
    finished gate, its ONNX still hashes to the intake tag, and the STRIP artifact *inside its guarded
    model* (the one that serves) hashes to `trojan_gate.strip.artifact_sha256` and verifies against
    the model (model and bank hashes)."""
    from trojan_gate.gates.strip import Strip, artifact_sha256

    client = client or MlflowClient()
    ref = resolve(name, version, client=client)
    tags = version_tags(ref, client)
    verdict = tags.get(tag("verdict"))
    if verdict not in PROMOTABLE:
        raise PromotionRefused(f"{ref.uri} has verdict {verdict or 'none (never gated)'}; "
                               f"only {' or '.join(PROMOTABLE)} versions can be promoted")
    if tags.get(tag("gate.state")) != "done":
        raise PromotionRefused(f"{ref.uri} has gate state {tags.get(tag('gate.state')) or 'none'}: a gate is "
                               "running or was interrupted; promote after it has finished")
    expected = tags.get(tag("strip.artifact_sha256"))
    guarded_uri = tags.get(tag("guarded_model"))
    if not expected or not guarded_uri:
        raise PromotionRefused(f"{ref.uri} has no STRIP threshold or guarded model attached")
    try:
        onnx_path = fetch_onnx(ref, client=client)
        guarded = resolve(guarded_uri, client=client)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=guarded.uri,
                                                         dst_path=tempfile.mkdtemp(prefix="trojan-gate-promote-")))
        boundary = guarded_artifact(local, "boundary")
        actual = artifact_sha256(boundary)
        if actual != expected:
            raise PromotionRefused(f"the STRIP artifact inside {guarded.uri} hashes to {actual[:12]}…, "
                                   f"{ref.uri}'s tag says {expected[:12]}…")
        Strip.load(boundary, ModelOracle(onnx_path), progress=False)
    except PromotionRefused:
        raise
    except Exception as e:
        raise PromotionRefused(f"STRIP artifact of {ref.uri} does not verify: {type(e).__name__}: {e}") from e
    return {"model_uri": ref.uri, "verdict": verdict, "strip_artifact_sha256": expected, "guarded_model": guarded.uri}


def promote(name: str, version: str | int, alias: str = "production", client: MlflowClient | None = None) -> dict:
    """Move `alias` to the version after `verify_for_promotion`, under the gate's version lock."""
    from .gate.verdict import version_lock

    client = client or MlflowClient()
    ref = resolve(name, version, client=client)
    with version_lock(ref):
        info = verify_for_promotion(name, version, client)
        client.set_registered_model_alias(name, alias, str(version))
        client.set_model_version_tag(name, str(version), tag(f"promoted.{alias}"), "true")
    return {**info, "alias": alias}
