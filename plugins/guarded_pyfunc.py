"""The guarded pyfunc: the ONNX classifier plus its STRIP boundary, checking every input.

Logged with models-from-code (`guarded_model_code.py` calls `mlflow.models.set_model`);
artifacts: `onnx_model` (the single-file ONNX) and `boundary` (the STRIP artifact
directory). Loading verifies both hashes; predict returns, per input, the label, its
probability, the STRIP entropy and `trojan_suspected`. Param `policy`: `flag` (default)
keeps the label, `reject` replaces a suspected input's label with -1.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from trojan_gate.gates.guard import POLICIES, REJECTED_LABEL
CODE_FILE = Path(__file__).with_name("guarded_model_code.py")


class GuardedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trojan_gate.gates.guard import GuardedClassifier

        # verifies the model sha256 recorded in the artifact and the bank's sha256
        self._guard = GuardedClassifier.from_artifacts(context.artifacts["onnx_model"], context.artifacts["boundary"])

    def predict(self, context, model_input: np.ndarray, params=None):
        # np.ndarray is a hint MLflow reads as "no schema from type hints": the logged TensorSpec
        # signature stays the contract. A DataFrame of flattened images is reshaped all the same.
        policy = (params or {}).get("policy", "flag")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        shape = self._guard.oracle.input_shape
        if x.ndim == 2 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape((-1,) + tuple(shape))
        out = self._guard.predict(x.astype(np.float32, copy=False))
        if policy == "reject":  # same rule as GuardedClassifier(policy="reject")
            out["label"][out["trojan_suspected"]] = REJECTED_LABEL
            out["probability"][out["trojan_suspected"]] = 0.0
        return pd.DataFrame({
            "label": np.asarray(out["label"], dtype=np.int64),
            "probability": np.asarray(out["probability"], dtype=np.float64),
            "entropy": np.asarray(out["entropy"], dtype=np.float64),
            "trojan_suspected": np.asarray(out["trojan_suspected"], dtype=bool),
        })


def guarded_signature(input_shape):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) + tuple(input_shape))]),
        outputs=Schema([ColSpec("long", "label"), ColSpec("double", "probability"),
                        ColSpec("double", "entropy"), ColSpec("boolean", "trojan_suspected")]),
        params=ParamSchema([ParamSpec("policy", "string", "flag")]),
    )
