"""The guarded pyfunc: the ONNX classifier plus its STRIP threshold, checking every input.

Logged with models-from-code (`guarded_model_code.py` calls `mlflow.models.set_model`);
artifacts: `onnx_model` (the single-file ONNX) and `boundary` (the STRIP artifact directory).
Loading verifies both hashes. The input is exactly what the logged signature says: a float32
tensor (n, C, H, W) in [0, 1]. Per input, predict returns `label`, `probability`,
`instance_score` (the STRIP normalised entropy) and `is_trojaned`. Param `policy`: `flag`
(default) keeps the label, `reject` replaces a flagged input's label with -1.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from trojan_gate.gates.strip.guard import POLICIES, REJECTED_LABEL

CODE_FILE = Path(__file__).with_name("guarded_model_code.py")
OUTPUT_COLUMNS = ("label", "probability", "instance_score", "is_trojaned")


class GuardedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trojan_gate.gates.strip.guard import GuardedClassifier

        # verifies the model sha256 recorded in the artifact and the bank's sha256
        self._guard = GuardedClassifier.from_artifacts(context.artifacts["onnx_model"], context.artifacts["boundary"])

    def predict(self, context, model_input: np.ndarray, params=None):
        # np.ndarray is a hint MLflow reads as "no schema from type hints": the logged TensorSpec
        # signature (n, C, H, W) float32 stays the contract, and the oracle checks the shape again.
        policy = (params or {}).get("policy", "flag")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        out = self._guard.predict(np.asarray(model_input, dtype=np.float32))
        if policy == "reject":  # same rule as GuardedClassifier(policy="reject")
            out["label"][out["is_trojaned"]] = REJECTED_LABEL
            out["probability"][out["is_trojaned"]] = 0.0
        return pd.DataFrame({
            "label": np.asarray(out["label"], dtype=np.int64),
            "probability": np.asarray(out["probability"], dtype=np.float64),
            "instance_score": np.asarray(out["instance_score"], dtype=np.float64),
            "is_trojaned": np.asarray(out["is_trojaned"], dtype=bool),
        })


def guarded_signature(input_shape):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) + tuple(int(v) for v in input_shape))]),
        outputs=Schema([ColSpec("long", "label"), ColSpec("double", "probability"),
                        ColSpec("double", "instance_score"), ColSpec("boolean", "is_trojaned")]),
        params=ParamSchema([ParamSpec("policy", "string", "flag")]),
    )
