"""The guarded pyfunc: a signed release (ONNX + run-time check + verdict) checking every input.

Logged with models-from-code (`guarded_model_code.py` calls `mlflow.models.set_model`);
artifacts: `release` (model.onnx, boundary/, verdict.json) and `signature` (see `signing`).
Loading refuses unless the signature verifies with the public key in `TROJAN_GATE_VERIFY_KEY`,
the signed verdict is passed or patched, the ONNX and the artifact hash to what the verdict
names, and the registry does not revoke it (`revocation`: the version it serves was blocked by a
later gate; checked when the registry is reachable, logged when not, refused when not and
`TROJAN_GATE_REQUIRE_REVOCATION_CHECK=1`). The serving policy (`reject` by default: a flagged
input's label is -1; `flag`: the label is kept) and the row cap come from the signed verdict; a client's `params` change nothing.

The input is what the logged signature says: a float32 tensor (n, C, H, W) in [0, 1]. Per input,
predict returns `label`, `probability`, `instance_score` (higher means more trojan-like: the run-time
check's negated min-p, or STRIP's negated entropy), `is_trojaned` (score >= threshold) and
`model_calls` (the served model's inputs the check cost: the input and its copies) and `reference_calls`
(the reference classifier's). A refused request (wrong shape, values out of range, too many rows) comes back as
HTTP 400 with the reason, never a stack trace.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

CODE_FILE = Path(__file__).with_name("guarded_model_code.py")
REQUIRE_REVOCATION_ENV = "TROJAN_GATE_REQUIRE_REVOCATION_CHECK"
log = logging.getLogger("trojan_gate.guarded")


def revocation(verdict: dict, client=None) -> str | None:
    """Why the registry revokes this signed release (None: it does not, or it could not be read,
    which is logged; with `TROJAN_GATE_REQUIRE_REVOCATION_CHECK=1` an unreadable registry raises).
    A release is revoked when a later gate blocked the version it serves (`revoke_release`)."""
    from .registry import resolve, tag, version_tags

    try:
        ref = resolve(str(verdict.get("model")), client=client)
        tags = version_tags(ref, client)
    except Exception as e:
        if os.environ.get(REQUIRE_REVOCATION_ENV) == "1":
            raise RuntimeError(f"the registry could not be read to check revocation of {verdict.get('model')}: "
                               f"{type(e).__name__}: {e}") from e
        log.warning("revocation of %s not checked: the registry could not be read (%s)", verdict.get("model"),
                    type(e).__name__)
        return None
    if tags.get(tag("verdict")) == "blocked":
        return f"{ref.uri} was blocked by a later gate (run {tags.get(tag('gate.run_id'))}): its release is revoked"
    return None
OUTPUT_COLUMNS = ("label", "probability", "instance_score", "is_trojaned", "model_calls", "reference_calls")


def load_release(release, signature, public_key=None):
    """Verify a signed release and build its GuardedClassifier; returns (guard, verdict document)."""
    from trojan_gate.gates.errors import ArtifactIntegrityError
    from trojan_gate.gates.guard import GuardedClassifier

    from .signing import SERVABLE, verify_release

    verdict = verify_release(release, signature, public_key)
    if verdict.get("verdict") not in SERVABLE:
        raise ArtifactIntegrityError(f"the signed verdict of {verdict.get('model')} is {verdict.get('verdict')!r}; "
                                     f"only {' or '.join(SERVABLE)} models are served")
    serving = verdict.get("serving") or {}
    guard = GuardedClassifier.from_artifacts(Path(release) / "model.onnx", Path(release) / "boundary",
                                             policy=serving.get("policy", "reject"),
                                             expected_sha256=verdict.get("check_artifact_sha256"))
    if guard.oracle.sha256 != verdict.get("model_sha256"):
        raise ArtifactIntegrityError("the release's model.onnx is not the model its verdict names")
    guard.oracle.probe(examples=guard.detector.bank_)  # keyed probes on the serving host, held-out images mixed in
    return guard.warm(), verdict


def load_served_release(release, signature, public_key=None, client=None):
    """`load_release`, then refused (ArtifactIntegrityError) when the registry revokes it."""
    from trojan_gate.gates.errors import ArtifactIntegrityError

    guard, verdict = load_release(release, signature, public_key)
    why = revocation(verdict, client)
    if why:
        raise ArtifactIntegrityError(why)
    return guard, verdict


class GuardedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self._guard, verdict = load_served_release(context.artifacts["release"], context.artifacts["signature"])
        self._max_rows = int((verdict.get("serving") or {}).get("max_rows", 4096))

    def predict(self, context, model_input: np.ndarray, params=None):
        # np.ndarray is a hint MLflow reads as "no schema from type hints": the logged TensorSpec
        # signature (n, C, H, W) float32 stays the contract, and the oracle checks the shape again.
        from trojan_gate.gates.errors import InputShapeError, TrojanGateError

        x = np.asarray(model_input)
        if len(x.shape) and len(x) > self._max_rows:
            raise MlflowException(f"{len(x)} rows in one request; this model takes at most {self._max_rows}",
                                  error_code=INVALID_PARAMETER_VALUE)
        try:
            if x.ndim != 1 + len(self._guard.oracle.input_shape):
                raise InputShapeError(f"a request is a batch of images (n, {', '.join(map(str, self._guard.oracle.input_shape))}); "
                                      f"got shape {x.shape}")
            out = self._guard.predict(x.astype(np.float32, copy=False))
        except TrojanGateError as e:  # inputs the oracle refuses: the client's mistake, said plainly
            raise MlflowException(f"input refused: {e}", error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as e:  # anything else: a 500 that names the error, without a stack trace
            raise MlflowException(f"the guarded model failed: {type(e).__name__}", error_code=INTERNAL_ERROR) from None
        return pd.DataFrame({
            "label": np.asarray(out["label"], dtype=np.int64),
            "probability": np.asarray(out["probability"], dtype=np.float64),
            "instance_score": np.asarray(out["instance_score"], dtype=np.float64),
            "is_trojaned": np.asarray(out["is_trojaned"], dtype=bool),
            "model_calls": np.asarray(out["model_calls"], dtype=np.int64),
            "reference_calls": np.asarray(out["reference_calls"], dtype=np.int64),
        })


def guarded_signature(input_shape):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) + tuple(int(v) for v in input_shape))]),
        outputs=Schema([ColSpec("long", "label"), ColSpec("double", "probability"),
                        ColSpec("double", "instance_score"), ColSpec("boolean", "is_trojaned"),
                        ColSpec("long", "model_calls"), ColSpec("long", "reference_calls")]),
    )
