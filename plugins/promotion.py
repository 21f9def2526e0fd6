"""Release approval: move an alias (e.g. `production`) only to a version the gate let through.

Refuses unless the version's `trojan_gate.verdict` is passed or patched, its ONNX still
hashes to the intake tag, and its STRIP artifact downloads, hashes to
`trojan_gate.strip.artifact_sha256` and verifies against the model (model + bank hashes).
"""
from __future__ import annotations

import tempfile

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates.errors import TrojanGateError
from trojan_gate.gates.oracle import ModelOracle

from .registry import fetch_onnx, resolve, tag, version_tags

PROMOTABLE = ("passed", "patched")


class PromotionRefused(TrojanGateError):
    """The version may not receive the alias; the message says why."""


def verify_for_promotion(name: str, version: str | int, client: MlflowClient | None = None) -> dict:
    from trojan_gate.gates.strip import StripDetector, artifact_sha256

    client = client or MlflowClient()
    ref = resolve(name, version, client=client)
    tags = version_tags(ref, client)
    verdict = tags.get(tag("verdict"))
    if verdict not in PROMOTABLE:
        raise PromotionRefused(f"{ref.uri} has verdict {verdict or 'none (never gated)'}; "
                               f"only {' or '.join(PROMOTABLE)} versions can be promoted")
    expected = tags.get(tag("strip.artifact_sha256"))
    artifact_uri = tags.get(tag("strip.artifact_uri"))
    if not expected or not artifact_uri:
        raise PromotionRefused(f"{ref.uri} has no STRIP boundary attached")
    try:
        onnx_path = fetch_onnx(ref, client=client)
        local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri,
                                                    dst_path=tempfile.mkdtemp(prefix="trojan-gate-promote-"))
        actual = artifact_sha256(local)
        if actual != expected:
            raise PromotionRefused(f"STRIP artifact of {ref.uri} hashes to {actual[:12]}…, tag says {expected[:12]}…")
        StripDetector.load(local, ModelOracle(onnx_path), progress=False)
    except PromotionRefused:
        raise
    except Exception as e:
        raise PromotionRefused(f"STRIP artifact of {ref.uri} does not verify: {type(e).__name__}: {e}") from e
    return {"model_uri": ref.uri, "verdict": verdict, "strip_artifact_sha256": expected}


def promote(name: str, version: str | int, alias: str = "production", client: MlflowClient | None = None) -> dict:
    client = client or MlflowClient()
    info = verify_for_promotion(name, version, client)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), tag(f"promoted.{alias}"), "true")
    return {**info, "alias": alias}
