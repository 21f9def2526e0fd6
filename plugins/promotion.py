"""Release approval: move an alias (e.g. `production`) to the guarded model of a version the gate let through.

Refuses unless a finished gate decided the version passed or patched, its ONNX still hashes
to the intake tag, and its guarded model is a release signed by the gate's key whose verdict,
model and STRIP artifact are the version's (see `signing`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates.errors import TrojanGateError

from .registry import check_registered, resolve, tag, version_tags

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
    """Refuse (PromotionRefused, naming why) unless a finished gate decided the version passed or
    patched, its ONNX still hashes to the intake tag, and its guarded model (the one that serves)
    is a release whose signature verifies with `TROJAN_GATE_VERIFY_KEY`, whose signed verdict is
    the registry's, and whose model and STRIP artifact are the version's."""
    from .guarded_pyfunc import load_release

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
    expected = tags.get(tag("check.artifact_sha256"))
    guarded_uri = tags.get(tag("guarded_model"))
    if not expected or not guarded_uri:
        raise PromotionRefused(f"{ref.uri} has no run-time check (trojan_gate.check.*) or guarded model attached; "
                               "a version gated before the check.* tags must be gated again")
    try:
        check_registered(ref, client)  # re-hashed against the intake tag
        guarded = resolve(guarded_uri, client=client)
        if version_tags(guarded, client).get(tag("revoked")):
            raise PromotionRefused(f"{guarded.uri} is revoked: {version_tags(guarded, client)[tag('revoked')]}")
        with tempfile.TemporaryDirectory(prefix="trojan-gate-promote-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=guarded.uri, dst_path=tmp))
            _, signed = load_release(guarded_artifact(local, "release"), guarded_artifact(local, "signature"))
    except PromotionRefused:
        raise
    except Exception as e:
        raise PromotionRefused(f"the guarded model of {ref.uri} does not verify: {type(e).__name__}: {e}") from e
    mismatched = [k for k, want in (("verdict", verdict), ("model_sha256", tags.get(tag("sha256"))),
                                    ("check_artifact_sha256", expected)) if signed.get(k) != want]
    if mismatched:
        raise PromotionRefused(f"the signed release of {guarded.uri} disagrees with {ref.uri}'s tags on {mismatched}")
    return {"model_uri": ref.uri, "verdict": verdict, "check_artifact_sha256": expected, "guarded_model": guarded.uri}


def promote(name: str, version: str | int, alias: str = "production", client: MlflowClient | None = None) -> dict:
    """Move `alias` to the version's guarded model (`NAME-guarded`, the model that checks every
    input) after `verify_for_promotion`, under the gate's version lock. The raw ONNX version never
    holds the release alias (one it held is removed): serving it by alias would skip the run-time
    check. The raw version is tagged `trojan_gate.promoted.<alias>` with the guarded model's URI."""
    from .gate.verdict import version_lock

    client = client or MlflowClient()
    ref = resolve(name, version, client=client)
    with version_lock(ref):
        info = verify_for_promotion(name, version, client)
        guarded = resolve(info["guarded_model"], client=client)
        client.set_registered_model_alias(guarded.name, alias, guarded.version)
        if alias in (client.get_registered_model(ref.name).aliases or {}):
            client.delete_registered_model_alias(ref.name, alias)
        client.set_model_version_tag(name, str(version), tag(f"promoted.{alias}"), guarded.uri)
    return {**info, "alias": alias, "serve": f"models:/{guarded.name}@{alias}"}
